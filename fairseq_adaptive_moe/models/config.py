"""The MoE options shared by every architecture of this plugin: one dataclass field per knob,
and their one check.

:func:`check_moe_args` is the only validation of the MoE options and raises one error type,
:class:`~fairseq_adaptive_moe.errors.MoEConfigError`, naming the flag. Every caller uses it: the
architectures at start-up (:func:`check_and_configure_moe_args`), ``adaptive-moe-upcycle``, and
the criterion's config for the loss weights (:func:`check_loss_weights`). The gate options are
checked by the plain-PyTorch core's :func:`~fairseq_adaptive_moe.moe.check_gate_config` (which
the layer runs for its direct users too) and reported under their flag names here; the
expert-parallel ones by :func:`fairseq_adaptive_moe.distributed.check_args`.
"""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..moe import BALANCE_TOKENS, COMBINE_WEIGHTS, EVAL_GATING, GATING_POLICIES, THRESHOLD_PROBS
from ..moe import BudgetConfig, GateConfigError, check_gate_config
from .. import distributed
from ..errors import MoEConfigError  # noqa: F401  (re-exported: models.config.MoEConfigError)


BALANCE_TOKENS_CHOICES = ("auto",) + BALANCE_TOKENS
COMBINE_WEIGHTS_CHOICES = ("auto",) + COMBINE_WEIGHTS
LOSS_WEIGHTS = ("moe_balance_loss_weight", "moe_z_loss_weight")


@dataclass
class MoEConfig(FairseqDataclass):
    moe_gating: ChoiceEnum(GATING_POLICIES) = field(
        default="adaptive",
        metadata={"help": "gating while training: top1 (Switch), top2 (GShard), or adaptive "
                          "(a token takes its top-2 experts iff p1 - p2 <= --moe-threshold) "
                          "(default: adaptive)"},
    )
    moe_threshold: float = field(
        default=0.1,
        metadata={"help": "adaptive gating threshold T: the expert of rank j is used iff "
                          "p1 - pj <= T; 0 routes as top1, >= 1 as top-(--moe-max-experts) "
                          "(default: 0.1)"},
    )
    moe_max_experts: int = field(
        default=2,
        metadata={"help": "most experts an adaptive token may use (the paper: 2) (default: 2)"},
    )
    moe_expert_count: int = field(
        default=16, metadata={"help": "experts per MoE layer (default: 16; tiny archs: 4)"}
    )
    moe_freq: int = field(
        default=1,
        metadata={"help": "every N-th encoder and decoder layer (layers N, 2N, ...) has an MoE "
                          "FFN; 0 = dense baseline in the same code path (default: 1)"},
    )
    moe_capacity_factor: float = field(
        default=0.0,
        metadata={"help": "0 = dropless (every token processed); c > 0 caps each expert at "
                          "ceil(c * tokens / experts) slots, GShard priority order, for "
                          "capacity-limited baselines; drops are counted (default: 0)"},
    )
    moe_eval_gating: ChoiceEnum(EVAL_GATING) = field(
        default="top1",
        metadata={"help": "gating at inference (fairseq-generate, -interactive, -eval-lm, "
                          "adaptive-moe-routing): top1, as the paper evaluates; train keeps "
                          "--moe-gating (at generation time: --model-overrides "
                          "\"{'moe_eval_gating': 'train'}\"). Validation during training logs "
                          "valid_loss under --moe-gating and loss_top1 beside it (default: top1)"},
    )
    moe_threshold_probs: ChoiceEnum(THRESHOLD_PROBS) = field(
        default="softmax",
        metadata={"help": "probabilities the threshold compares: softmax over all experts, or "
                          "renormalized over the top-(--moe-max-experts) candidates "
                          "(default: softmax)"},
    )
    moe_combine_weights: ChoiceEnum(COMBINE_WEIGHTS_CHOICES) = field(
        default="auto",
        metadata={"help": "combine weights: each used expert's softmax probability (Switch; a "
                          "single-expert token gets p1), or renormalized over the used experts "
                          "(GShard, DeepSpeed: they sum to 1); auto: renormalized for "
                          "--moe-gating top2 (the GShard baseline), softmax otherwise. Saved "
                          "resolved with the checkpoint (default: auto)"},
    )
    moe_balance_tokens: ChoiceEnum(BALANCE_TOKENS_CHOICES) = field(
        default="auto",
        metadata={"help": "tokens whose first choice counts in the balance loss's f1: single "
                          "(the paper: tokens that used one expert), first (GShard: every "
                          "token), or auto: first for --moe-gating top2 (which has no "
                          "single-expert token, so single would switch balancing off), single "
                          "otherwise (default: auto)"},
    )
    moe_expert_parallel_size: int = field(
        default=1,
        metadata={"help": "expert parallelism: each group of P consecutive ranks shares one copy "
                          "of the experts, E/P per rank, tokens sent to their experts by a "
                          "dropless all-to-all; P must divide the expert count and the world "
                          "size; 1 = experts replicated on every rank (default: 1)"},
    )
    moe_two_expert_budget: Optional[float] = field(
        default=None,
        metadata={"help": "compute budget S (0 < S < 1, --moe-gating adaptive): each MoE layer's "
                          "threshold T is adjusted while training so that the share of its "
                          "tokens taking 2+ experts tracks S; --moe-threshold is the starting T; "
                          "T is saved in checkpoints (docs/budget.md) (default: off, T fixed)"},
    )
    moe_budget_gain: float = field(
        default=0.5,
        metadata={"help": "budget controller: T <- T * exp(gain * e) at each step, e = "
                          "(S - share) / min(S, 1 - S) clipped to [-1, 1] (default: 0.5)"},
    )
    moe_budget_interval: int = field(
        default=1,
        metadata={"help": "budget controller: updates per step; the share is measured over "
                          "them, on all ranks (default: 1)"},
    )
    moe_budget_min_threshold: float = field(
        default=1e-6, metadata={"help": "budget controller: lower bound of T, > 0 (default: 1e-6)"},
    )
    moe_budget_max_threshold: float = field(
        default=1.0,
        metadata={"help": "budget controller: upper bound of T (1.0: every token may take "
                          "--moe-max-experts) (default: 1.0)"},
    )
    moe_budget_warmup_updates: int = field(
        default=0,
        metadata={"help": "budget controller: T stays at --moe-threshold for the first N "
                          "updates (default: 0)"},
    )
    moe_budget_freeze_after: int = field(
        default=0,
        metadata={"help": "budget controller: T stops changing after N updates; 0 = never "
                          "(default: 0)"},
    )


def resolve_combine_weights(cfg) -> str:
    """``--moe-combine-weights`` with ``auto`` resolved for ``--moe-gating``: top-2 combines as
    GShard and DeepSpeed do, ``p_j / (p_1 + p_2)``; top-1 (Switch) and adaptive gating keep the
    softmax probabilities (docs/computation.md)."""
    weights = getattr(cfg, "moe_combine_weights", None) or "auto"
    if weights == "auto":
        return "renormalized" if cfg.moe_gating == "top2" else "softmax"
    return weights


def resolve_balance_tokens(cfg) -> str:
    """``--moe-balance-tokens`` with ``auto`` resolved for ``--moe-gating``."""
    tokens = getattr(cfg, "moe_balance_tokens", "auto")
    if tokens == "auto":
        return "first" if cfg.moe_gating == "top2" else "single"
    return tokens


MOE_DEFAULTS = {name: f.default for name, f in MoEConfig.__dataclass_fields__.items()
                if name.startswith("moe_")}


GATE_OPTION_FLAGS = {
    "num_experts": "moe_expert_count", "policy": "moe_gating", "eval_policy": "moe_eval_gating",
    "threshold": "moe_threshold", "max_experts": "moe_max_experts",
    "capacity_factor": "moe_capacity_factor", "threshold_probs": "moe_threshold_probs",
    "combine_weights": "moe_combine_weights",
}
#: BudgetConfig field -> the MoEConfig option that sets it
BUDGET_FIELDS = {
    "target": "moe_two_expert_budget", "gain": "moe_budget_gain",
    "interval": "moe_budget_interval", "min_threshold": "moe_budget_min_threshold",
    "max_threshold": "moe_budget_max_threshold", "warmup_updates": "moe_budget_warmup_updates",
    "freeze_after": "moe_budget_freeze_after",
}
GATE_OPTION_FLAGS.update({f"budget.{k}": v for k, v in BUDGET_FIELDS.items()})


def budget_config(cfg) -> Optional[BudgetConfig]:
    """The gates' :class:`~fairseq_adaptive_moe.moe.BudgetConfig` from the ``moe_*budget*``
    options of ``cfg``, or None without ``--moe-two-expert-budget`` (options a config lacks,
    e.g. one of an older checkpoint, take their defaults)."""
    if getattr(cfg, "moe_two_expert_budget", None) is None:
        return None
    values = {k: getattr(cfg, name, None) for k, name in BUDGET_FIELDS.items()}
    return BudgetConfig(**{k: MOE_DEFAULTS[BUDGET_FIELDS[k]] if v is None else v
                           for k, v in values.items()})


def set_moe_defaults(args, **arch_defaults) -> None:
    """Fill unset MoE options on an argparse namespace or a checkpoint's config (architecture
    defaults first) and resolve ``--moe-combine-weights auto``.

    At training time this runs on the parsed flags, so the config fairseq saves with the
    checkpoint holds every option as trained, resolved; a loaded checkpoint's saved values are
    kept (only unset ones are filled). Every checkpoint of this plugin saves
    ``moe_eval_gating`` and ``moe_combine_weights`` (both options date from its first
    version), so one written before their defaults changed keeps ``train`` and ``softmax``."""
    for name, default in {**MOE_DEFAULTS, **arch_defaults}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    args.moe_combine_weights = resolve_combine_weights(args)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_loss_weights(cfg) -> None:
    """Raise :class:`MoEConfigError` for a negative (or NaN) MoE loss weight on ``cfg``; weights
    ``cfg`` does not have are skipped (the model's options do not always carry the criterion's)."""
    for name in LOSS_WEIGHTS:
        value = getattr(cfg, name, None)
        if value is not None and not value >= 0:
            raise MoEConfigError(f"{_flag(name)} must be >= 0, got {value}")


def check_moe_args(args) -> None:
    """Raise :class:`MoEConfigError` naming the first bad MoE flag on ``args``: the one check of
    the MoE options (see the module docstring)."""
    if args.moe_freq < 0:
        raise MoEConfigError(f"{_flag('moe_freq')} must be >= 0, got {args.moe_freq}")
    try:
        check_gate_config(args.moe_expert_count, args.moe_gating, args.moe_threshold,
                          args.moe_max_experts, args.moe_eval_gating, args.moe_capacity_factor,
                          args.moe_threshold_probs, resolve_combine_weights(args),
                          budget_config(args))
    except GateConfigError as e:
        name = GATE_OPTION_FLAGS[e.option]
        raise MoEConfigError(f"{_flag(name)} {str(e).split(' ', 1)[1]}") from None
    distributed.check_args(args)  # ExpertParallelError, an MoEConfigError naming its flag
    check_loss_weights(args)


def check_and_configure_moe_args(args) -> None:
    """At start-up (architecture hooks run right after parsing, before anything is written):
    :func:`check_moe_args`, then the launch settings expert parallelism needs.

    Raises :class:`MoEConfigError`; under fairseq's command-line tools the plugin's boundary
    (:mod:`fairseq_adaptive_moe.errors`) prints it as one ``error:`` line and exits with status 1.
    """
    check_moe_args(args)
    distributed.configure_launch(args)
