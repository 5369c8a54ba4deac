"""Upcycling: a dense fairseq transformer or BART checkpoint -> an adaptive MoE one.

The library behind ``adaptive-moe-upcycle`` (:mod:`fairseq_adaptive_moe.cli.upcycle`); from
Python, :func:`upcycle_checkpoint` does what the command does, and :func:`upcycle` converts a
dense model already in memory into an MoE model built with its dimensions.

Sparse upcycling (Komatsuzaki et al., 2022): every ``--moe-freq``-th encoder and decoder layer
gets ``--moe-expert-count`` experts, each a copy of that layer's dense FFN, by
:func:`fairseq_adaptive_moe.models.dense_to_moe.dense_ffn_to_experts`, the same conversion that
``--restore-file`` of a dense BART into ``adaptive_moe_bart`` runs.
All other weights are copied unchanged. The output is an ``adaptive_moe_transformer`` checkpoint
(from a ``transformer``) or an ``adaptive_moe_bart`` one (from a ``bart``: architecture
``adaptive_moe_bart_base`` / ``_large`` for ``bart_base`` / ``bart_large``, else
``adaptive_moe_bart``), with the dense model's dimensions; a BART's classification heads come
along.

Choices, and why:

* Combine weights default to ``renormalized`` (the used experts' probabilities divided by their
  sum). With identical experts a token's MoE output is then ``sum_j w_j FFN(x) = FFN(x)`` whatever
  the routing, so the upcycled model reproduces the dense model exactly before training (up to
  float rounding). With ``softmax`` weights the FFN output would be scaled by ``sum_j p_j < 1``.
* Gate: a new linear layer d -> E without bias. By default it gets ``nn.Linear``'s init,
  ``U(-1/sqrt(d), 1/sqrt(d))``, drawn after ``torch.manual_seed(--seed)``: the same init as a gate
  trained from scratch. ``--gate-init-std s`` draws ``N(0, s^2)`` instead; ``s = 0`` is a zero
  gate (uniform probabilities, so every token starts as a tie and adaptive gating sends it to
  two experts). Either way the dense outputs are reproduced.
* ``--noise-std r`` adds ``r * rms(W) * N(0, 1)`` to every expert copy of every FFN tensor W
  (independently per expert, seeded by ``--seed``) to break the symmetry between experts; the
  outputs then differ from the dense model's by about that much.
* No optimizer state is written (the dense optimizer's moments have no expert shapes), so train
  on with ``fairseq-train ... --restore-file OUT --reset-optimizer``; :func:`train_flags` gives
  the model flags that rebuild exactly this architecture.

Input: fairseq's ``transformer`` model (any of its architectures, e.g. ``transformer``,
``transformer_wmt_en_de_big``, ``transformer_wmt19_de_en``, ``transformer_tiny``), fairseq's
``bart`` (``bart_base``, ``bart_large``, ``mbart_*``), or an ``adaptive_moe_transformer`` /
``adaptive_moe_bart`` trained with ``--moe-freq 0``. (``fairseq-train --arch adaptive_moe_bart
--restore-file`` of a dense BART does the same conversion when loading, without this tool.)
"""

import argparse
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, NamedTuple, Optional

import torch

from ..models.dense_to_moe import MoECheckpointError, dense_ffn_to_experts, moe_layers

PROG = "adaptive-moe-upcycle"
MOE_ARCH = "adaptive_moe_transformer"
MOE_BART_ARCH = "adaptive_moe_bart"


class UpcycleError(Exception):
    """Bad input (the message names the flag or file); raised before anything is written."""


def moe_options(args=None, **given) -> dict:
    """Every MoE option (``moe_*``, as fairseq-train's ``--moe-*`` flags): from ``args`` (a
    namespace holding them all), else the defaults updated by ``given``."""
    from ..models.config import MOE_DEFAULTS

    if args is not None:
        return {name: getattr(args, name) for name in MOE_DEFAULTS}
    unknown = sorted(set(given) - set(MOE_DEFAULTS))
    if unknown:
        raise UpcycleError(f"unknown MoE options {unknown}; expected some of {sorted(MOE_DEFAULTS)}")
    return {**MOE_DEFAULTS, **given}


def check_inputs(dense: str, out: str, options: dict, data: Optional[str] = None,
                 noise_std: float = 0.0, gate_init_std: Optional[float] = None,
                 force: bool = False) -> None:
    """Raise :class:`UpcycleError` naming the first bad option or missing file."""
    from ..models.config import MoEConfigError, check_moe_args

    try:
        check_moe_args(argparse.Namespace(**options))
    except MoEConfigError as e:
        raise UpcycleError(str(e)) from None
    if options["moe_freq"] == 0:
        raise UpcycleError("--moe-freq 0 makes no MoE layer; give N >= 1 (layers N, 2N, ... "
                           "become MoE)")
    if not noise_std >= 0:
        raise UpcycleError(f"--noise-std must be >= 0, got {noise_std}")
    if gate_init_std is not None and not gate_init_std >= 0:
        raise UpcycleError(f"--gate-init-std must be >= 0, got {gate_init_std}")
    if not os.path.isfile(dense):
        raise UpcycleError(f"dense checkpoint not found: {dense}")
    if os.path.exists(out) and not force:
        raise UpcycleError(f"{out} exists; pass --force to overwrite it")
    if data is not None and not os.path.isdir(data):
        raise UpcycleError(f"--data directory not found: {data}")


# ---- the dense checkpoint ----------------------------------------------------------------------

def load_dense(path: str, data: Optional[str]):
    """(state, cfg, MoE arch) of the dense checkpoint; UpcycleError unless it is a dense fairseq
    transformer or BART."""
    import fairseq_adaptive_moe  # noqa: F401  (registers the models; lets torch >= 2.6 load)
    from fairseq import checkpoint_utils

    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path, {"data": data} if data else None)
    except Exception as e:  # noqa: BLE001  (pickle, torch and omegaconf raise many kinds)
        raise UpcycleError(f"cannot read {path}: {_first_line(e)}") from None
    cfg = state.get("cfg")
    if cfg is None or cfg.get("model") is None or "model" not in state:
        raise UpcycleError(f"{path} is not a fairseq model checkpoint (no cfg.model / model)")
    return state, cfg, check_dense_arch(cfg.model, path)


def model_class(model_cfg):
    """(architecture name, its registered fairseq model class or None)."""
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    name = getattr(model_cfg, "_name", None) or getattr(model_cfg, "arch", None)
    return name, ARCH_MODEL_REGISTRY.get(name) or MODEL_REGISTRY.get(name)


def check_dense_arch(model_cfg, path: str) -> str:
    """The MoE architecture the dense checkpoint becomes; UpcycleError if it cannot."""
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.models.bart import BARTModel
    from fairseq.models.transformer import TransformerModel

    from ..models import AdaptiveMoEBARTModel, AdaptiveMoETransformerModel

    name, cls = model_class(model_cfg)
    if cls is None:
        raise UpcycleError(f"{path}: unknown architecture {name!r} (is its --user-dir imported?)")
    if cls in (AdaptiveMoETransformerModel, AdaptiveMoEBARTModel):
        if getattr(model_cfg, "moe_freq", 1) != 0:
            raise UpcycleError(f"{path} is already an MoE checkpoint (arch {name}, --moe-freq "
                               f"{getattr(model_cfg, 'moe_freq', '?')}); give a dense one")
        return MOE_ARCH if cls is AdaptiveMoETransformerModel else name
    if cls is BARTModel:  # bart_base -> adaptive_moe_bart_base, ...
        moe_name = f"adaptive_moe_{name}"
        return moe_name if ARCH_MODEL_REGISTRY.get(moe_name) is AdaptiveMoEBARTModel else MOE_BART_ARCH
    if cls is not TransformerModel:
        raise UpcycleError(f"{path}: unsupported architecture {name!r} ({cls.__name__}); "
                           f"{PROG} upcycles fairseq 'transformer' and 'bart' checkpoints "
                           "(transformer, transformer_wmt19_de_en, transformer_tiny, bart_base, "
                           "bart_large, ...)")
    return MOE_ARCH


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---- the MoE model -----------------------------------------------------------------------------

def moe_model_args(dense_args, options: dict, arch: str = MOE_ARCH) -> argparse.Namespace:
    """The dense model's namespace (all its dimensions) as the MoE architecture ``arch``."""
    args = copy.deepcopy(dense_args)
    if not isinstance(args, argparse.Namespace):  # a dataclass-style model config
        args = argparse.Namespace(**dict(args))
    args.arch = args._name = arch
    for name, value in options.items():
        setattr(args, name, value)
    return args


@torch.no_grad()
def upcycle(dense_model, moe_model, noise_std: float = 0.0, gate_init_std: Optional[float] = None,
            seed: int = 1) -> List[str]:
    """Copy ``dense_model`` into ``moe_model`` in place; returns the MoE layers' module names.

    The dense state dict goes through :func:`dense_ffn_to_experts` (each MoE layer's experts
    become copies of the dense layer's fc1/fc2), every other weight is copied by name. Then, per
    MoE layer in module order: ``r * rms(W) * N(0, 1)`` noise on every expert copy of every FFN
    tensor W (``noise_std`` r > 0, generator seeded ``seed + 1``), and ``N(0, gate_init_std^2)``
    gate weights (generator seeded ``seed + 2``; None keeps the gate's init). Raises
    UpcycleError if any weight of either model is left without a counterpart.
    """
    state = dense_model.state_dict()
    try:
        converted = set(dense_ffn_to_experts(moe_model, state, init="copy"))
    except MoECheckpointError as e:
        raise UpcycleError(str(e)) from None
    layers = []
    noise = torch.Generator().manual_seed(seed + 1)
    gate_gen = torch.Generator().manual_seed(seed + 2)
    for name, module in moe_layers(moe_model):
        prefix = name[: -len(".moe")]
        if prefix not in converted:
            raise UpcycleError(f"dense layer {prefix} has no fc1/fc2 FFN to copy")
        experts = module.experts
        if noise_std > 0:
            for tensor in (experts.fc1_weight, experts.fc1_bias, experts.fc2_weight, experts.fc2_bias):
                rms = tensor[0].float().pow(2).mean().sqrt()
                for e in range(tensor.shape[0]):
                    tensor[e].add_((noise_std * rms * torch.randn(tensor.shape[1:], generator=noise))
                                   .to(tensor.dtype))
        if gate_init_std is not None:
            w = module.gate.wg.weight
            w.copy_(torch.randn(w.shape, generator=gate_gen) * gate_init_std)
        layers.append(name)

    moe_state = moe_model.state_dict()
    for key, value in moe_state.items():
        if key.endswith((".gate.budget_threshold", ".gate.budget_counts")):
            state[key] = value  # a two-expert budget's state starts fresh: T = --moe-threshold
        elif key not in state:
            raise UpcycleError(f"the MoE model's {key} has no dense counterpart")
        if state[key].shape != value.shape:
            raise UpcycleError(f"{key}: dense shape {tuple(state[key].shape)} != MoE "
                               f"shape {tuple(value.shape)}")
    left = sorted(set(state) - set(moe_state))
    if left:
        raise UpcycleError(f"dense weights with no place in the MoE model: {', '.join(left[:5])}"
                           + (" ..." if len(left) > 5 else ""))
    moe_model.load_state_dict(state, strict=True)
    return layers


class TrainFlags(NamedTuple):
    """The fairseq-train model flags, and the options no flag can set as in the model."""

    flags: List[str]
    unset: List[str]


def train_flags(moe_args) -> TrainFlags:
    """The fewest fairseq-train model flags that rebuild ``moe_args``'s architecture.

    Parsed as fairseq-train does (model flags default to unset, then the architecture function
    fills them); a flag is kept only if dropping it would change a model option. ``unset`` names
    the options that still differ (e.g. one that is on by default and off here: no flag turns it
    off).
    """
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    arch = moe_args.arch
    arch_function = ARCH_CONFIG_REGISTRY[arch]
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group(argument_default=argparse.SUPPRESS)
    ARCH_MODEL_REGISTRY[arch].add_args(group)
    actions = [a for a in group._group_actions if hasattr(moe_args, a.dest)]

    def differences(items) -> List[str]:
        ns = parser.parse_args([tok for item in items for tok in item])
        arch_function(ns)
        return [a.dest for a in actions if not _same(getattr(ns, a.dest, None),
                                                     getattr(moe_args, a.dest))]

    items = []
    for action in actions:
        value, flag = getattr(moe_args, action.dest), max(action.option_strings, key=len)
        if value is None or (action.nargs == 0 and not value):
            continue
        items.append([flag] if action.nargs == 0 else [flag, str(value)])
    for item in list(items):
        trial = [i for i in items if i is not item]
        if not differences(trial):
            items = trial
    return TrainFlags(["--arch", arch] + [tok for item in items for tok in item], differences(items))


def _same(a, b) -> bool:
    """Equal values; a few fairseq flags have no type (``--decoder-output-dim`` parses as text)."""
    if a == b or str(a) == str(b):
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


# ---- the whole conversion ----------------------------------------------------------------------

@dataclass
class UpcycleResult:
    """What :func:`upcycle_checkpoint` wrote."""

    out: Path
    arch: str  # the MoE architecture
    layers: List[str]  # the MoE layers' module names (encoder.layers.0.moe ...)
    gate_init: str  # how the gates were initialised, in words
    train_flags: TrainFlags  # the fairseq-train model flags that rebuild the architecture
    task: str  # the checkpoint's fairseq task
    record: dict  # extra_state["upcycle"] of the written checkpoint


def upcycle_checkpoint(dense: str, out: str, options: dict, data: Optional[str] = None,
                       noise_std: float = 0.0, gate_init_std: Optional[float] = None,
                       seed: int = 1, force: bool = False, command: str = "") -> UpcycleResult:
    """Read the dense checkpoint ``dense``, write its upcycled MoE checkpoint to ``out``.

    ``options``: every MoE option (:func:`moe_options`; ``moe_expert_count`` and the others as
    the ``--moe-*`` flags). ``data``: the data-bin directory with the checkpoint's dictionaries
    (default: the path stored in the checkpoint). The gates' ``nn.Linear`` init is drawn after
    ``torch.manual_seed(seed)``; ``noise_std``, ``gate_init_std`` and ``seed`` as in
    :func:`upcycle`. The checkpoint holds the model, the dense run's config with the MoE model
    options, no optimizer state, and ``extra_state["upcycle"]`` (source, ``command``, layers,
    options, train flags). Raises :class:`UpcycleError` before writing anything.
    """
    check_inputs(dense, out, options, data, noise_std, gate_init_std, force)
    state, cfg, arch = load_dense(dense, data)
    from fairseq import tasks

    try:
        task = tasks.setup_task(cfg.task)
    except Exception as e:  # noqa: BLE001  (missing dictionaries, unknown task, ...)
        raise UpcycleError(f"cannot set up task {cfg.task.get('_name')!r} from data "
                           f"{cfg.task.get('data')!r} ({_first_line(e)}); give --data DIR "
                           "holding the checkpoint's dictionaries") from None
    dense_cfg = copy.deepcopy(cfg.model)
    if arch != MOE_ARCH:  # BART: keep the classification heads (BART drops them otherwise)
        dense_cfg.load_checkpoint_heads = True
    dense_model = task.build_model(dense_cfg)
    try:
        dense_model.load_state_dict(state["model"], strict=True, model_cfg=dense_cfg)
    except RuntimeError as e:
        raise UpcycleError(f"{dense}: weights do not match the stored architecture: "
                           f"{_first_line(e)}") from None
    moe_args = moe_model_args(cfg.model, options, arch)
    torch.manual_seed(seed)  # the gates' nn.Linear init
    moe_model = task.build_model(moe_args)
    for head, module in getattr(dense_model, "classification_heads", {}).items():
        moe_model.register_classification_head(head, module.out_proj.out_features,
                                               module.dense.out_features)
    layers = upcycle(dense_model, moe_model, noise_std, gate_init_std, seed)
    if not layers:
        raise UpcycleError(f"--moe-freq {options['moe_freq']} leaves no MoE layer in a "
                           f"{moe_args.encoder_layers}+{moe_args.decoder_layers}-layer model")

    from omegaconf import OmegaConf

    flags = train_flags(moe_args)
    out_cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    out_cfg["model"] = moe_args
    gate_init = ("nn.Linear default U(-1/sqrt(d), 1/sqrt(d))" if gate_init_std is None
                 else f"N(0, {gate_init_std}^2)")
    record = dict(
        source=os.path.abspath(dense), command=command,
        moe_layers=layers, moe=options, noise_std=noise_std, gate_init=gate_init,
        seed=seed, train_flags=flags.flags,
        note="no optimizer state: continue with fairseq-train --restore-file ... --reset-optimizer",
    )
    out_state = {
        "args": None,
        "cfg": out_cfg,
        "model": moe_model.state_dict(),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "none (upcycled)", "optimizer_name": "none (upcycled)",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "task_state": state.get("task_state", {}),
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True,
                                           "version": 2},
                        "upcycle": record},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(out_state, tmp)
    os.replace(tmp, out)
    return UpcycleResult(out, arch, layers, gate_init, flags, cfg.task.get("_name"), record)
