"""``adaptive-moe-upcycle``: a dense fairseq transformer or BART checkpoint -> an adaptive MoE one.

Flags and the exit status only; the conversion is :mod:`fairseq_adaptive_moe.tools.upcycle`
(its docstring says what is copied, and why the defaults are what they are).
Exit status: 0 written, 2 bad input (one line on stderr, nothing written).
"""

import argparse
import shlex
import sys
from typing import Optional, Sequence

from ..tools.upcycle import PROG, UpcycleError, moe_options, upcycle_checkpoint


def build_parser() -> argparse.ArgumentParser:
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    from ..models.config import MoEConfig

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Turn a dense fairseq transformer (or BART) checkpoint into an "
                    "adaptive_moe_transformer (adaptive_moe_bart) checkpoint whose experts are "
                    "copies of the dense FFNs.",
        epilog="Continue training with fairseq-train DATA --user-dir fairseq_adaptive_moe "
               "--restore-file OUT --reset-optimizer and the model flags this tool prints.",
    )
    p.add_argument("dense", metavar="DENSE", help="dense fairseq checkpoint (.pt)")
    p.add_argument("--out", "-o", required=True, help="the MoE checkpoint to write (.pt)")
    p.add_argument("--data", default=None,
                   help="data-bin directory holding the checkpoint's dictionaries (default: the "
                        "data path stored in the checkpoint)")
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="relative noise on each expert copy: W_e = W + r * rms(W) * N(0, 1), "
                        "independently per expert (default: 0, exact copies)")
    p.add_argument("--gate-init-std", type=float, default=None,
                   help="gate weights ~ N(0, std^2); default: nn.Linear's U(-1/sqrt(d), 1/sqrt(d)); "
                        "0 = zero gate (uniform gate probabilities)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the gate init and the noise (default: 1)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    moe = p.add_argument_group("MoE options (as fairseq-train's --moe-*)")
    gen_parser_from_dataclass(moe, MoEConfig())
    for action in moe._group_actions:
        if action.dest == "moe_expert_count":
            action.required, action.default = True, None
            action.help = "experts per MoE layer (required)"
        elif action.dest == "moe_combine_weights":
            action.default = "renormalized"
            action.help = ("combine weights (default: renormalized, so that identical experts "
                           "reproduce the dense FFN exactly; softmax scales it by sum p_j)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        result = upcycle_checkpoint(
            args.dense, args.out, moe_options(args), data=args.data, noise_std=args.noise_std,
            gate_init_std=args.gate_init_std, seed=args.seed, force=args.force,
            command=shlex.join([PROG] + argv))
    except UpcycleError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if result.train_flags.unset:
        print(f"{PROG}: warning: no fairseq-train flag sets {', '.join(result.train_flags.unset)} "
              "as in the checkpoint", file=sys.stderr)
    sides = {}
    for name in result.layers:
        side, _, index = name.split(".")[:3]
        sides.setdefault(side, []).append(int(index))
    where = ", ".join(f"{side} layers {idx}" for side, idx in sides.items())
    print(f"{PROG}: wrote {result.out}: {result.arch}, {args.moe_expert_count} experts in {where}; "
          f"combine weights {args.moe_combine_weights}, noise {args.noise_std}, gate init "
          f"{result.gate_init}, seed {args.seed}; no optimizer state")
    if args.moe_combine_weights != "renormalized" or args.moe_capacity_factor > 0:
        print(f"{PROG}: note: with softmax combine weights or a capacity limit the upcycled model "
              "does not reproduce the dense outputs")
    print(f"{PROG}: continue training with:\n  fairseq-train DATA --user-dir fairseq_adaptive_moe "
          f"--task {result.task} {shlex.join(result.train_flags.flags)} --criterion "
          f"adaptive_moe_label_smoothed_cross_entropy --restore-file {shlex.quote(str(result.out))} "
          "--reset-optimizer ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
