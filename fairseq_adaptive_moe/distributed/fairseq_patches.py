"""Every change this plugin makes to fairseq's internals, applied by one :func:`install`.

fairseq has no hooks for expert-sharded parameters, so expert parallelism
(:mod:`.expert_parallel`) replaces five methods of fairseq 0.12 (two are properties) with wrappers. Each wrapper reads
the :class:`~.expert_parallel.ExpertParallelState` from the model it works on (the state rides on
the expert parameters, see :func:`~.expert_parallel.state_of`) and, for a model without one,
calls fairseq's own method and returns its result unchanged. A sixth wrapper serves the
curriculum (:mod:`fairseq_adaptive_moe.tasks.curriculum`):

=========================================================  ======================================
fairseq internal                                           what the wrapper adds under expert
                                                           parallelism, and why
=========================================================  ======================================
``distributed.LegacyDistributedDataParallel``              after legacy_ddp's reduction of the
``.all_reduce_grads(self)``                                shared gradients (it skips ``expert``
                                                           ones), the expert gradients are summed
                                                           over the replica group and divided by
                                                           W: one update of one process
``trainer.Trainer.clip_grad_norm(self, clip_norm)``        fairseq's ``utils.clip_grad_norm_``
                                                           leaves ``expert`` gradients out of the
                                                           norm; the wrapper passes the
                                                           optimizer an ``aggregate_norm_fn``
                                                           that adds the squared norm of all P
                                                           shards, so the norm (logged ``gnorm``,
                                                           and the clipping) is the global one
``trainer.Trainer.checkpoint_suffix`` (property)           ``-ep{r}``: each shard its own file
``trainer.Trainer.should_save_checkpoint_on_current_rank`` the ranks of the first group save
(property)                                                 (each shard once), not rank 0 alone
``trainer.Trainer.load_checkpoint(self, filename, ...)``   after loading, the ranks check that
                                                           their shards are of one step
                                                           (:func:`~.expert_parallel.check_shards_agree`)
``checkpoint_utils.save_checkpoint(cfg, trainer, ...)``    every rank first calls its task's
                                                           ``flush_complexity`` (if it has one):
                                                           the curriculum's pending rows are
                                                           gathered from all ranks before rank 0
                                                           writes them (fairseq calls the
                                                           iterator's ``state_dict`` on the
                                                           saving rank alone)
=========================================================  ======================================

Why the trainer's ``clip_grad_norm`` and not ``utils.clip_grad_norm_`` itself: the trainer knows
its model, where the state is; the parameters ``utils.clip_grad_norm_`` receives may be the fp32
copies of ``--fp16 --fp16-no-flatten-grads``, which carry fairseq's ``expert`` tag and nothing
else. ``utils.clip_grad_norm_`` stays fairseq's own; the expert norm is read inside the
``aggregate_norm_fn`` it calls, i.e. after the optimizer unscaled (``--amp``) or copied
(``--fp16``) the gradients: the model's expert gradients, equal to those it clips.

:func:`install` also wraps ``sys.excepthook`` (:func:`fairseq_adaptive_moe.errors.install_excepthook`):
fairseq's command-line tools own their ``main``, so an uncaught error of this plugin becomes
``error: <message>`` there instead of a traceback.

:func:`install` runs when the plugin registers its fairseq models (fairseq's ``--user-dir``
import), before any trainer exists. It is idempotent: a wrapper is recognised by a mark on the
function, so a second call, or a second copy of this module, leaves fairseq as it is. Before
changing anything it checks the fairseq version and the signature of every method it wraps, and
raises :class:`FairseqPatchError`, one line naming what no longer matches, if fairseq changed. The
originals stay reachable as ``wrapper.__wrapped__`` (see :func:`originals`).
"""

import functools
import inspect
from typing import Callable, Dict, List, Tuple

from ..errors import AdaptiveMoEError, install_excepthook
from .expert_parallel import check_shards_agree, expert_grad_sq_norm, reduce_expert_grads, shard_suffix, state_of

SUPPORTED_FAIRSEQ = "0.12."  # the 0.12 series: fairseq 0.12.2 and fairseq-fixed 0.12.3.x
MARK = "__adaptive_moe_patch__"

# (owner, attribute, is_property, the signature this plugin was written against)
TARGETS: List[Tuple[str, str, bool, str]] = [
    ("fairseq.distributed.LegacyDistributedDataParallel", "all_reduce_grads", False, "(self)"),
    ("fairseq.trainer.Trainer", "clip_grad_norm", False, "(self, clip_norm)"),
    ("fairseq.trainer.Trainer", "checkpoint_suffix", True, "(self) -> str"),
    ("fairseq.trainer.Trainer", "should_save_checkpoint_on_current_rank", True, "(self) -> bool"),
    ("fairseq.trainer.Trainer", "load_checkpoint", False,
     "(self, filename, reset_optimizer=False, reset_lr_scheduler=False, optimizer_overrides=None, "
     "reset_meters=False)"),
    ("fairseq.checkpoint_utils", "save_checkpoint", False,
     "(cfg: fairseq.dataclass.configs.CheckpointConfig, trainer, epoch_itr, val_loss)"),
]
# what the wrappers call with arguments of their own, checked too
CALLED: List[Tuple[str, str, str]] = [
    ("fairseq.optim.fairseq_optimizer.FairseqOptimizer", "clip_grad_norm",
     "(self, max_norm, aggregate_norm_fn=None)"),
    ("fairseq.utils", "clip_grad_norm_", "(params, max_norm, aggregate_norm_fn=None) -> torch.Tensor"),
]


class FairseqPatchError(AdaptiveMoEError):
    """The installed fairseq differs from the one whose internals this plugin wraps."""


def _resolve(dotted: str):
    """``fairseq.trainer.Trainer`` -> the class (or module) object."""
    import importlib

    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return importlib.import_module(dotted)


def _function(owner, attr: str, is_property: bool):
    """The function fairseq defines for ``owner.attr`` (a property's getter), under any wrapper
    of ours."""
    value = inspect.getattr_static(owner, attr, None)
    if is_property:
        if not isinstance(value, property):
            return None
        value = value.fget
    elif isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    while getattr(value, MARK, False):
        value = value.__wrapped__
    return value


def _check(fairseq_version: str) -> None:
    """Raise :class:`FairseqPatchError` naming the first wrapped or called fairseq function whose
    signature is not the one this plugin was written against."""
    if not fairseq_version.startswith(SUPPORTED_FAIRSEQ):
        raise FairseqPatchError(
            f"fairseq {fairseq_version} is not supported: fairseq_adaptive_moe patches fairseq "
            f"{SUPPORTED_FAIRSEQ}x internals (install fairseq 0.12)")
    checks = [(owner, attr, is_prop, sig) for owner, attr, is_prop, sig in TARGETS]
    checks += [(owner, attr, False, sig) for owner, attr, sig in CALLED]
    for dotted, attr, is_property, expected in checks:
        name = f"{dotted}.{attr}"
        try:
            fn = _function(_resolve(dotted), attr, is_property)
        except ImportError:
            fn = None
        if fn is None or not callable(fn):
            raise FairseqPatchError(
                f"fairseq {fairseq_version} has no {name}{' property' if is_property else ''}, "
                "which fairseq_adaptive_moe patches or calls; this plugin supports fairseq "
                f"{SUPPORTED_FAIRSEQ}x")
        found = str(inspect.signature(fn))
        if found != expected:
            raise FairseqPatchError(
                f"fairseq {fairseq_version} changed {name}{found}, which fairseq_adaptive_moe "
                f"patches or calls as {attr}{expected}; re-check fairseq_adaptive_moe.distributed."
                "fairseq_patches against this fairseq")


def _mark(wrapper: Callable, original: Callable) -> Callable:
    functools.update_wrapper(wrapper, original)  # name, doc, and __wrapped__ = the original
    setattr(wrapper, MARK, True)
    return wrapper


def _all_reduce_grads(original):
    def all_reduce_grads(self):
        original(self)
        state = state_of(self.module)
        if state is not None and not self.accumulate_grads:  # accumulate_grads: inside no_sync
            reduce_expert_grads(self.module, state)

    return _mark(all_reduce_grads, original)


def _clip_grad_norm(original):
    def clip_grad_norm(self, clip_norm):
        model = self._model
        state = state_of(model)
        if state is None:
            return original(self, clip_norm)

        def with_experts(shared_norm):
            # called by fairseq's utils.clip_grad_norm_ with its norm of the non-expert gradients,
            # after the optimizer unscaled (--amp) or copied (--fp16) them: the expert gradients
            # of the model are read at the same point, on every rank
            expert_sq = expert_grad_sq_norm(model, state)
            if expert_sq is None:
                return shared_norm
            return (shared_norm.float() ** 2 + expert_sq.to(shared_norm.device)).sqrt()

        # expert parallelism refuses fully_sharded, the one backend for which fairseq's method
        # passes an aggregate_norm_fn of its own
        return self.optimizer.clip_grad_norm(clip_norm, aggregate_norm_fn=with_experts)

    return _mark(clip_grad_norm, original)


def _checkpoint_suffix(original):
    def checkpoint_suffix(self) -> str:
        base = original(self)
        state = state_of(self._model)
        return base if state is None else base + shard_suffix(state.rank)

    return _mark(checkpoint_suffix, original)


def _should_save_checkpoint_on_current_rank(original):
    def should_save_checkpoint_on_current_rank(self) -> bool:
        state = state_of(self._model)
        if state is None:
            return original(self)
        return self.data_parallel_rank < state.size  # the first group holds every shard once

    return _mark(should_save_checkpoint_on_current_rank, original)


def _load_checkpoint(original):
    def load_checkpoint(self, filename, *args, **kwargs):
        extra_state = original(self, filename, *args, **kwargs)
        if state_of(self._model) is not None:
            check_shards_agree(self._model, self.get_num_updates(), filename)
        return extra_state

    return _mark(load_checkpoint, original)


def _save_checkpoint(original):
    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        flush = getattr(trainer.task, "flush_complexity", None)
        if flush is not None:  # on every rank: a collective when there are several
            flush()
        return original(cfg, trainer, epoch_itr, val_loss)

    return _mark(save_checkpoint, original)


WRAPPERS = {
    "all_reduce_grads": _all_reduce_grads,
    "clip_grad_norm": _clip_grad_norm,
    "checkpoint_suffix": _checkpoint_suffix,
    "should_save_checkpoint_on_current_rank": _should_save_checkpoint_on_current_rank,
    "load_checkpoint": _load_checkpoint,
    "save_checkpoint": _save_checkpoint,
}


def install() -> None:
    """Apply every patch of fairseq internals listed in this module's docstring, once.

    Idempotent. Raises :class:`FairseqPatchError` (one line) before changing anything if the
    installed fairseq's version or one of the wrapped or called signatures differs.
    """
    install_excepthook()  # first: a mismatch below is then reported in one line too
    import fairseq

    _check(getattr(fairseq, "__version__", "unknown"))
    for dotted, attr, is_property, _ in TARGETS:
        owner = _resolve(dotted)
        current = inspect.getattr_static(owner, attr)
        fn = current.fget if is_property else current
        if getattr(fn, MARK, False):
            continue
        wrapper = WRAPPERS[attr](fn)
        setattr(owner, attr, property(wrapper, doc=current.__doc__) if is_property else wrapper)


def originals() -> Dict[str, Callable]:
    """``Owner.attr`` -> fairseq's own function (a property's getter) behind each wrapper: what
    tests compare the wrappers against."""
    out = {}
    for dotted, attr, is_property, _ in TARGETS:
        out[f"{dotted.rpartition('.')[2]}.{attr}"] = _function(_resolve(dotted), attr, is_property)
    return out
