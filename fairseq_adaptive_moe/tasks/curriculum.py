"""The complexity curriculum (paper §3.2) for any fairseq task: :class:`CurriculumTaskMixin`.

``adaptive_moe_translation`` (also BART summarization) and ``adaptive_moe_language_modeling``
are fairseq's ``translation`` and ``language_modeling`` tasks with this mixin; another task gets
the curriculum the same way (``class MyTask(CurriculumTaskMixin, FairseqTask)`` with
:class:`MoECurriculumConfig` mixed into its config; its criterion must be an ``adaptive_moe_*``
one, which returns the per-sample rows).

With ``--moe-curriculum``, from epoch ``--moe-curriculum-start-epoch`` on each training epoch's
batches are built from samples of similar complexity (see
:mod:`fairseq_adaptive_moe.data.curriculum` for the ordering rules and the batches). Without
the switch, and in the epochs before the start epoch, the order is fairseq's usual one.

How the pieces meet:
- collection: in ``train_step`` the criterion (``adaptive_moe_*``) returns each sample's
  two-expert counts under a private logging key; the task pops the key before fairseq's logging
  all-reduce and keeps the rows on the device. Every ``--moe-curriculum-flush-updates`` updates,
  at every epoch start and before every checkpoint (all ranks at once), the pending rows are
  all-gathered over the data-parallel ranks and applied to the tracker in rank order, so every
  rank holds the same statistics; that is the only host read, none in the step itself. Flushing
  earlier or later gives the same statistics (rows apply in order, the last one of a sample
  wins), so a resumed run orders its epochs as the uninterrupted one.
- ordering: the training ``EpochBatchIterator`` gets a callable batch sampler, which fairseq
  calls at the start of every epoch; curriculum epochs are not re-shuffled by fairseq, and the
  ordered batches are sharded over the ranks afterwards, as usual.
- checkpoints: the trackers and, mid-epoch, the epoch's batch order travel in the iterator's
  state (``extra_state["train_iterator"]``), which fairseq restores on every rank before
  training resumes; ``--reset-dataloader`` resets them with the data order. A checkpoint without
  them (trained without the curriculum) starts collecting from there.
- sharded data (``data1:data2:...``, one shard per epoch in turn): one tracker per shard; an
  epoch is ordered by what was collected the last time its shard was trained on.
"""

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any

from omegaconf import II

import numpy as np
import torch

from fairseq import utils
from fairseq.data import FairseqDataset, data_utils, iterators
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.distributed import utils as distributed_utils

from ..data.curriculum import (
    ORDERS,
    SAMPLE_COMPLEXITY_KEY,
    SHUFFLE_MODES,
    ComplexityTracker,
    balance_steps,
    batch_complexity_spread,
    batch_loads,
    curriculum_batches,
    sample_keys,
    shuffle_in_buckets,
    step_imbalance,
)
from ..errors import MoEConfigError

logger = logging.getLogger(__name__)

STATE_KEY = "moe_curriculum"
POSITIVE = ("moe_curriculum_start_epoch", "moe_curriculum_bucket_steps",
            "moe_curriculum_flush_updates")


@dataclass
class MoECurriculumConfig(FairseqDataclass):
    """The curriculum options, mixed into a task's config."""

    moe_curriculum: bool = field(
        default=False,
        metadata={"help": "order each training epoch by sample complexity (paper §3.2): "
                          "batches of samples whose per-layer two-expert shares are alike, "
                          "collected from the training forward passes (default: off, fairseq's "
                          "order)"},
    )
    moe_curriculum_start_epoch: int = field(
        default=2,
        metadata={"help": "first epoch ordered by complexity; earlier epochs use fairseq's "
                          "order and collect the statistics (default: 2)"},
    )
    moe_curriculum_order: ChoiceEnum(ORDERS) = field(
        default="mean",
        metadata={"help": "how samples are ordered: mean, by the mean over layers of their "
                          "two-expert share, simplest first; cosine, the paper's §3.2: by the "
                          "cosine similarity of their complexity vector to the simplest "
                          "sample's (ignores magnitude); random, a random order each epoch (the "
                          "paper's baseline loader, not a curriculum) (default: mean)"},
    )
    moe_curriculum_window: int = field(
        default=1,
        metadata={"help": "1: fairseq's own batches, ordered by their samples' complexity (same "
                          "batches and tokens per update as without the curriculum); W > 1: "
                          "fairseq batches pooled W at a time and re-sorted by complexity before "
                          "cutting (batches more alike, a few percent more padding and batches); "
                          "0: all samples ordered, then cut (the paper's construction; mixes "
                          "lengths: about 1.7x fairseq's batches) (default: 1)"},
    )
    moe_curriculum_balance_steps: int = field(
        default=8,
        metadata={"help": "with several data-parallel ranks: re-pair the ordered batches within "
                          "windows of this many updates so that the ranks of one update get "
                          "similar MoE work (non-padding tokens times experts, from the tracked "
                          "two-expert shares); the same batches, the windows kept in complexity "
                          "order; 0: off (default: 8)"},
    )
    moe_curriculum_shuffle: ChoiceEnum(SHUFFLE_MODES) = field(
        default="none",
        metadata={"help": "after ordering: none keeps the complexity order (the paper); buckets "
                          "shuffles training steps within consecutive buckets of "
                          "--moe-curriculum-bucket-steps steps, seeded by --seed and the epoch "
                          "(default: none)"},
    )
    moe_curriculum_bucket_steps: int = field(
        default=16,
        metadata={"help": "steps per bucket for --moe-curriculum-shuffle buckets; a step is one "
                          "update: a batch per data-parallel rank per --update-freq micro-batch "
                          "(default: 16)"},
    )

    # fairseq's --update-freq, read from the training config (not a flag of its own): bucket
    # shuffling moves whole updates
    moe_curriculum_update_freq: Any = II("optimization.update_freq")
    moe_curriculum_flush_updates: int = field(
        default=100,
        metadata={"help": "the per-sample complexity rows stay on the device and are gathered "
                          "over the ranks and moved to the host every this many updates, at "
                          "every epoch start and before every checkpoint (default: 100)"},
    )

    def __post_init__(self):  # hydra/yaml configs; the command line is checked by argparse
        for name in ("moe_curriculum_start_epoch", "moe_curriculum_bucket_steps",
                     "moe_curriculum_flush_updates"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise MoEConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("moe_curriculum_window", "moe_curriculum_balance_steps"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 0:
                raise MoEConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")


def _at_least(low: int):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


class CurriculumTaskMixin:
    """``--moe-curriculum`` for a fairseq task (mixed in before the task class)."""

    cfg: MoECurriculumConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.complexity = ComplexityTracker()  # the tracker of the shard being trained on
        self._trackers = {}  # shard index -> ComplexityTracker (one entry without shards)
        self._shard = None
        self._pending = []  # complexity rows on the device since the last flush
        self._last_update = None

    @property
    def curriculum_cfg(self):
        """The task's options: ``cfg`` (dataclass tasks), or ``args`` (fairseq's legacy tasks,
        such as ``language_modeling``)."""
        return self.cfg if getattr(self, "cfg", None) is not None else self.args

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # bad values: one argparse "error:" line, before fairseq writes anything
        for action in parser._actions:
            if action.dest in POSITIVE:
                action.type = _at_least(1)
            elif action.dest in ("moe_curriculum_window", "moe_curriculum_balance_steps"):
                action.type = _at_least(0)

    @property
    def collects_sample_complexity(self) -> bool:
        """Read by the criterion: return per-sample complexity while training."""
        return bool(self.curriculum_cfg.moe_curriculum)

    def _train_subset(self) -> str:
        return getattr(self.curriculum_cfg, "train_subset", "train")

    # -- collection --------------------------------------------------------------------------

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False,
                   **kwargs):
        loss, sample_size, logging_output = super().train_step(
            sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)
        rows = logging_output.pop(SAMPLE_COMPLEXITY_KEY, None)  # never reaches the all-reduce
        if not self.curriculum_cfg.moe_curriculum:
            return loss, sample_size, logging_output
        if rows is not None and not ignore_grad:  # a dummy batch repeats real samples
            self._pending.append(rows.detach())
        # the first micro-batch of every N-th update, on every rank at once (fairseq gives every
        # rank the same number of micro-batches, with dummy batches where a shard runs out)
        if update_num != self._last_update:
            self._last_update = update_num
            if update_num > 0 and update_num % self.curriculum_cfg.moe_curriculum_flush_updates == 0:
                self.flush_complexity()
        return loss, sample_size, logging_output

    def flush_complexity(self) -> None:
        """Gather the pending rows of every data-parallel rank (in rank order) and apply them to
        the tracker. A collective when there are several ranks: every rank must call it at the
        same point (the task does so at update boundaries, epoch starts and checkpoints)."""
        if not self.curriculum_cfg.moe_curriculum:
            return
        rows = torch.cat(self._pending) if self._pending else None
        self._pending = []
        self.complexity.update(_all_gather_rows(rows))

    # -- ordering ----------------------------------------------------------------------------

    def _use_shard(self, epoch: int, size: int) -> None:
        """Switch the tracker to the training shard of ``epoch`` (fairseq's ``load_dataset``
        takes shard ``(epoch - 1) % shards``), flushing the rows of the shard trained so far."""
        shards = len(utils.split_paths(self.curriculum_cfg.data))
        shard = (epoch - 1) % shards
        if shard != self._shard:
            self.flush_complexity()
            self._shard = shard
            self.complexity = self._trackers.setdefault(shard, self.complexity
                                                        if not self._trackers else ComplexityTracker())
        if self.complexity.resize(size):
            logger.warning("moe curriculum: the training set changed size; statistics reset")

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1,
                           num_shards=1, shard_id=0, num_workers=0, epoch=1, data_buffer_size=0,
                           disable_iterator_cache=False, skip_remainder_batch=False,
                           grouped_shuffling=False, update_epoch_batch_itr=False):
        is_train = dataset is self.datasets.get(self._train_subset())
        if not (self.curriculum_cfg.moe_curriculum and is_train):
            return super().get_batch_iterator(
                dataset, max_tokens=max_tokens, max_sentences=max_sentences,
                max_positions=max_positions, ignore_invalid_inputs=ignore_invalid_inputs,
                required_batch_size_multiple=required_batch_size_multiple, seed=seed,
                num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
                data_buffer_size=data_buffer_size, disable_iterator_cache=disable_iterator_cache,
                skip_remainder_batch=skip_remainder_batch, grouped_shuffling=grouped_shuffling,
                update_epoch_batch_itr=update_epoch_batch_itr)

        can_reuse = (not disable_iterator_cache and not update_epoch_batch_itr
                     and self.can_reuse_epoch_itr(dataset))
        if can_reuse and dataset in self.dataset_to_epoch_iter:
            return self.dataset_to_epoch_iter[dataset]
        assert isinstance(dataset, FairseqDataset)
        dataset.set_epoch(epoch)
        self._use_shard(epoch, len(dataset))

        sampler = CurriculumBatchSampler(
            self, max_positions=max_positions, ignore_invalid_inputs=ignore_invalid_inputs,
            max_tokens=max_tokens, max_sentences=max_sentences,
            required_batch_size_multiple=required_batch_size_multiple, seed=seed,
            num_shards=num_shards)
        epoch_iter = CurriculumEpochBatchIterator(
            dataset=dataset, collate_fn=dataset.collater, batch_sampler=sampler, seed=seed,
            num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
            buffer_size=data_buffer_size, skip_remainder_batch=skip_remainder_batch,
            grouped_shuffling=grouped_shuffling,
            reuse_dataloader=getattr(self.curriculum_cfg, "reuse_dataloader", True),
            persistent_workers=getattr(self.curriculum_cfg, "persistent_workers", True))
        if can_reuse:
            self.dataset_to_epoch_iter[dataset] = epoch_iter
        return epoch_iter

    # -- state ---------------------------------------------------------------------------------

    def curriculum_state(self) -> dict:
        """Every shard's tracker (tensors and ints only)."""
        self._trackers.setdefault(self._shard if self._shard is not None else 0, self.complexity)
        return {"tracker": self.complexity.state_dict(),
                "shards": {str(k): t.state_dict() for k, t in sorted(self._trackers.items())}}

    def load_curriculum_state(self, state: dict) -> None:
        shards = state.get("shards") or {str(self._shard or 0): state["tracker"]}
        for key, saved in shards.items():
            tracker = self._trackers.get(int(key))
            if tracker is None:
                tracker = self._trackers[int(key)] = ComplexityTracker(int(saved["num_samples"]))
            if tracker.num_samples and int(saved["num_samples"]) != tracker.num_samples:
                logger.warning("moe curriculum: the checkpoint's statistics are for another "
                               "training set size; starting afresh")
                continue
            tracker.load_state_dict(saved)
        self._pending = []


class CurriculumBatchSampler:
    """``(dataset, epoch) -> batches``, called by the iterator at the start of every epoch.

    Epochs before the start epoch get fairseq's batches, built as ``FairseqTask`` builds them
    (once, at the first call). Curriculum epochs order the same filtered samples by complexity,
    cut batches from each group with ``dataset.batch_by_size`` and the same limits, then apply
    ``--moe-curriculum-shuffle``.
    """

    def __init__(self, task, max_positions, ignore_invalid_inputs, max_tokens, max_sentences,
                 required_batch_size_multiple, seed, num_shards):
        self.task, self.cfg = task, task.curriculum_cfg
        self.max_positions, self.ignore_invalid_inputs = max_positions, ignore_invalid_inputs
        self.limits = dict(max_tokens=max_tokens, max_sentences=max_sentences,
                           required_batch_size_multiple=required_batch_size_multiple)
        self.seed, self.num_shards = seed, num_shards
        self._indices = self._base_batches = None

    @property
    def tracker(self) -> ComplexityTracker:
        return self.task.complexity

    def update_freq(self, epoch: int) -> int:
        """fairseq's ``--update-freq`` for ``epoch`` (one value, or one per epoch, the last
        repeating), 1 where the config does not carry it."""
        value = getattr(self.cfg, "moe_curriculum_update_freq", None)
        if value is None or isinstance(value, str):
            return 1
        values = [value] if isinstance(value, int) else list(value)
        return int(values[min(epoch, len(values)) - 1]) if values else 1

    def active(self, epoch: int) -> bool:
        return epoch >= self.cfg.moe_curriculum_start_epoch

    def base_batches(self, dataset, epoch):
        """fairseq's ``make_batches``, frozen at the first epoch seen, as fairseq freezes them."""
        if self._base_batches is None:
            with data_utils.numpy_seed(self.seed + epoch):
                indices = dataset.ordered_indices()
            if self.max_positions is not None:
                indices = self.task.filter_indices_by_size(
                    indices, dataset, self.max_positions, self.ignore_invalid_inputs)
            self._indices = indices
            self._base_batches = dataset.batch_by_size(indices, **self.limits)
        return self._base_batches

    def __call__(self, dataset, epoch):
        self.task.flush_complexity()  # every rank starts its epoch here
        self.base_batches(dataset, epoch)
        if not self.active(epoch):
            self._log(epoch, self._base_batches, f"inactive until epoch "
                      f"{self.cfg.moe_curriculum_start_epoch}, fairseq's order")
            return self._base_batches

        indices = self._indices
        lengths = _num_tokens(dataset, indices)
        order, window = self.cfg.moe_curriculum_order, self.cfg.moe_curriculum_window
        keys = np.full(len(dataset), np.inf)
        keys[indices] = sample_keys(indices, self.tracker.multi, self.tracker.tokens, lengths,
                                    order, seed=self.seed + epoch)
        length_of = np.zeros(len(dataset), np.int64)
        length_of[indices] = lengths
        batches = curriculum_batches(
            self._base_batches, keys, length_of,
            lambda ids: dataset.batch_by_size(ids, **self.limits), window)
        update_freq = self.update_freq(epoch)
        balance = self.cfg.moe_curriculum_balance_steps
        what = ""
        if balance and self.num_shards > 1:
            work = _moe_tokens(dataset)
            loads = batch_loads(batches, work, self.tracker.multi, self.tracker.tokens)
            before = step_imbalance(batches, loads, self.num_shards, update_freq)
            batches = balance_steps(batches, loads, keys, self.num_shards, update_freq, balance)
            loads = batch_loads(batches, work, self.tracker.multi, self.tracker.tokens)
            what = (f", balanced over {balance} updates (estimated rank imbalance {before:.3f} "
                    f"-> {step_imbalance(batches, loads, self.num_shards, update_freq):.3f})")
        shuffle = self.cfg.moe_curriculum_shuffle
        if shuffle == "buckets":  # whole updates: all ranks' micro-batches of one update
            batches = shuffle_in_buckets(batches, self.cfg.moe_curriculum_bucket_steps,
                                         self.num_shards * update_freq, self.seed + epoch)
        self._log(epoch, batches, f"active, ordered by complexity ({order}, window {window})"
                  f"{what}, shuffle {shuffle}; fairseq's batches: {len(self._base_batches)}")
        return batches

    def _log(self, epoch, batches, what):
        seen = int(self.tracker.seen().sum())
        line = (f"moe curriculum | epoch {epoch:03d} | {what} | seen {seen}/"
                f"{self.tracker.num_samples} samples | {len(batches)} batches")
        spread = batch_complexity_spread(batches, self.tracker.multi, self.tracker.tokens)
        if spread:
            line += (f" | batch 2x share min {spread['min']:.3f} median {spread['median']:.3f} "
                     f"max {spread['max']:.3f} | within-batch std {spread['within_std']:.3f}")
        elif self.active(epoch):
            line += " | no statistics yet (needs an adaptive_moe_* criterion and an MoE model)"
        logger.info(line)


class CurriculumEpochBatchIterator(iterators.EpochBatchIterator):
    """fairseq's iterator, except that curriculum epochs keep the sampler's order (fairseq would
    shuffle the batches), and its state carries the curriculum statistics."""

    @property
    def first_batch(self):
        """Only fairseq's dummy batch uses this: take it from fairseq's batches, so that a
        curriculum epoch is not ordered before a checkpoint's statistics are restored."""
        if self._frozen_batches is not None or not self.batch_sampler.active(self.epoch):
            return super().first_batch
        if not getattr(self.dataset, "supports_fetch_outside_dataloader", True):
            return "DUMMY"
        batch = self.batch_sampler.base_batches(self.dataset, self.epoch)[0]
        return self.collate_fn([self.dataset[i] for i in batch])

    def ordered_batches(self, epoch, fix_batches_to_gpus, shuffle):
        if self.batch_sampler.active(epoch):
            shuffle = False
        return super().ordered_batches(epoch, fix_batches_to_gpus, shuffle)

    def state_dict(self):
        state = super().state_dict()
        task = self.batch_sampler.task
        if distributed_utils.get_data_parallel_world_size() == 1:
            task.flush_complexity()  # with more ranks, the checkpoint hook has flushed on all
        curriculum = task.curriculum_state()
        if (state["iterations_in_epoch"] > 0 and state["epoch"] == self.epoch
                and self.batch_sampler.active(self.epoch)):
            # the order was computed from the statistics at the start of this epoch, which
            # have changed since: keep the order itself for an exact resume
            curriculum["epoch"] = self.epoch
            curriculum["batch_sizes"] = torch.tensor([len(b) for b in self.frozen_batches])
            curriculum["batches"] = torch.from_numpy(
                np.concatenate([np.asarray(b, dtype=np.int64) for b in self.frozen_batches]))
        state[STATE_KEY] = curriculum
        return state

    def load_state_dict(self, state_dict):
        curriculum = state_dict.get(STATE_KEY)
        if curriculum is None:
            logger.info("moe curriculum: the checkpoint has no curriculum statistics; collecting "
                        "from here")
        else:
            self.batch_sampler.task.load_curriculum_state(curriculum)
        self._frozen_batches = None  # rebuilt from the restored statistics when needed
        if (curriculum is not None and curriculum.get("epoch") == state_dict["epoch"]
                and state_dict.get("iterations_in_epoch", 0) > 0):
            flat = curriculum["batches"].numpy()
            ends = np.cumsum(curriculum["batch_sizes"].numpy())
            self._frozen_batches = tuple(np.split(flat, ends[:-1]))
        super().load_state_dict(state_dict)


def _moe_tokens(dataset) -> np.ndarray:
    """(N,) tokens each sample sends through the MoE layers: source plus target for a language
    pair (encoder and decoder layers), else fairseq's ``num_tokens``."""
    src, tgt = getattr(dataset, "src_sizes", None), getattr(dataset, "tgt_sizes", None)
    if src is not None:
        return np.asarray(src, dtype=np.int64) + (
            0 if tgt is None else np.asarray(tgt, dtype=np.int64))
    return _num_tokens(dataset, np.arange(len(dataset)))


def _num_tokens(dataset, indices) -> np.ndarray:
    """fairseq's ``num_tokens`` of ``indices``, vectorized where the dataset supports it."""
    try:
        return np.asarray(dataset.num_tokens_vec(indices), dtype=np.int64)
    except NotImplementedError:
        return np.array([dataset.num_tokens(i) for i in indices], dtype=np.int64)


def _all_gather_rows(rows):
    """Every data-parallel rank's complexity rows, concatenated in rank order (a CPU tensor, or
    None when there are none). With several ranks a collective: every rank calls it together."""
    if distributed_utils.get_data_parallel_world_size() == 1:
        return None if rows is None else rows.cpu()
    group = distributed_utils.get_data_parallel_group()
    device = rows.device if rows is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
        and torch.distributed.get_backend(group) == "nccl" else torch.device("cpu"))
    shape = torch.tensor([0, 0] if rows is None else list(rows.shape), dtype=torch.long,
                         device=device)
    shapes = [s.tolist() for s in distributed_utils.all_gather(shape, group)]
    n_max, width = max(s[0] for s in shapes), max(s[1] for s in shapes)
    if n_max == 0:
        return None
    buf = torch.zeros(n_max, width, dtype=torch.long, device=device)
    if rows is not None and rows.numel():
        buf[:rows.shape[0], :rows.shape[1]] = rows.to(device)
    parts = distributed_utils.all_gather(buf, group)
    return torch.cat([p[:n] for p, (n, _) in zip(parts, shapes)]).cpu()
