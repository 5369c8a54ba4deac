"""``adaptive-moe-consolidate``: merge the per-rank shards of an expert-parallel checkpoint into
one file, or re-shard them to another expert-parallel size.

Flags and the exit status only; the merge is :mod:`fairseq_adaptive_moe.tools.consolidate`.
Exit status: 0 written, 2 bad input (one line on stderr, nothing written).
"""

import argparse
import sys
from typing import Optional, Sequence

from ..tools.consolidate import ConsolidateError, consolidate, shard_paths

PROG = "adaptive-moe-consolidate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Merge the per-rank shards of an expert-parallel fairseq checkpoint "
                    "(NAME-ep0.pt, NAME-ep1.pt, ...) into one file, or re-shard them.",
        epilog="Example: adaptive-moe-consolidate checkpoints/checkpoint_last.pt --out "
               "model.pt, then fairseq-generate DATA --user-dir fairseq_adaptive_moe --path "
               "model.pt ...",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="the checkpoint name fairseq-train was given or wrote (e.g. "
                        "checkpoints/checkpoint_last.pt, whose shards are "
                        "checkpoint_last-ep0.pt ...), or any one shard; a one-file checkpoint "
                        "(P = 1) can be re-sharded too")
    p.add_argument("--out", "-o", required=True,
                   help="output name: the file itself for --expert-parallel-size 1; otherwise "
                        "the name whose shards OUT-ep0.pt ... are written (pass OUT to "
                        "fairseq-train --restore-file)")
    p.add_argument("--expert-parallel-size", type=int, default=1, metavar="P",
                   help="expert-parallel size of the output: 1 = one consolidated file "
                        "(default: 1)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    return p


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        paths = shard_paths(args.checkpoint)
        written = consolidate(paths, args.out, args.expert_parallel_size, args.force, warn=_warn)
    except ConsolidateError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: {len(paths)} shard(s) -> {len(written)} file(s): {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
