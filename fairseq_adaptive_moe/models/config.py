"""The MoE options shared by every architecture of this plugin: one dataclass field per knob."""

import sys
from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from ..moe import BALANCE_TOKENS, COMBINE_WEIGHTS, EVAL_GATING, GATING_POLICIES, THRESHOLD_PROBS
from ..moe import GateConfigError, check_gate_config
from .. import expert_parallel


BALANCE_TOKENS_CHOICES = ("auto",) + BALANCE_TOKENS


class MoEConfigError(ValueError):
    """A bad MoE option. The message names the flag."""


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
        default="train",
        metadata={"help": "gating when not training (validation, generation); 'train' keeps "
                          "--moe-gating, the paper evaluates with top1 (default: train)"},
    )
    moe_threshold_probs: ChoiceEnum(THRESHOLD_PROBS) = field(
        default="softmax",
        metadata={"help": "probabilities the threshold compares: softmax over all experts, or "
                          "renormalized over the top-(--moe-max-experts) candidates "
                          "(default: softmax)"},
    )
    moe_combine_weights: ChoiceEnum(COMBINE_WEIGHTS) = field(
        default="softmax",
        metadata={"help": "combine weights: each used expert's softmax probability (Switch; a "
                          "single-expert token gets p1), or renormalized over the used experts "
                          "(GShard; they sum to 1) (default: softmax)"},
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


def set_moe_defaults(args, **arch_defaults) -> None:
    """Fill missing MoE options on an argparse namespace (architecture defaults first)."""
    for name, default in {**MOE_DEFAULTS, **arch_defaults}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)


def check_moe_args(args) -> None:
    """Raise :class:`MoEConfigError` naming the first bad MoE flag on ``args``."""
    def flag(name):
        return "--" + name.replace("_", "-")

    if args.moe_freq < 0:
        raise MoEConfigError(f"{flag('moe_freq')} must be >= 0, got {args.moe_freq}")
    try:
        check_gate_config(args.moe_expert_count, args.moe_gating, args.moe_threshold,
                          args.moe_max_experts, args.moe_eval_gating, args.moe_capacity_factor,
                          args.moe_threshold_probs, args.moe_combine_weights)
    except GateConfigError as e:
        name = GATE_OPTION_FLAGS[e.option]
        raise MoEConfigError(f"{flag(name)} {str(e).split(' ', 1)[1]}") from None
    try:
        expert_parallel.check_args(args)
    except expert_parallel.ExpertParallelError as e:
        raise MoEConfigError(str(e)) from None
    for name in ("moe_balance_loss_weight", "moe_z_loss_weight"):
        value = getattr(args, name, None)
        if value is not None and not value >= 0:
            raise MoEConfigError(f"{flag(name)} must be >= 0, got {value}")


def exit_on_bad_moe_args(args) -> None:
    """At start-up (architecture hooks run right after parsing, before anything is written):
    one line on stderr and exit status 1 instead of a traceback."""
    try:
        check_moe_args(args)
        expert_parallel.configure_launch(args)
    except MoEConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(1) from None
