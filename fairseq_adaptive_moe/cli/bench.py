"""``adaptive-moe-bench``: the paper's Table 1, measured for several MoE implementations at once.

Flags and the exit status only; what is measured, and how, is :mod:`fairseq_adaptive_moe.tools.bench`.
Writes ``--out``/bench.json (after every token count) and bench.png, and prints the table.
Exit status: 0 done, 1 a fast path differs from the per-expert loop, 2 a bad flag.
"""

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..moe import ExpertFFN
from ..tools.bench import (
    DEFAULT_FRACTIONS, DTYPES, IMPLEMENTATIONS, BadFlag, describe_run, format_header, format_report,
    make_config, plot, run_bench,
)

PROG = "adaptive-moe-bench"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit status 2 (handled in main)
        raise BadFlag(message)


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.replace(",", " ").split()]


def _float_list(text: str) -> List[float]:
    return [float(v) for v in text.replace(",", " ").split()]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Time one MoE layer at exact fractions of single-expert tokens, relative to "
                    "top-2, for several implementations (the paper's Table 1, side by side).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: fp32 at a small shape (~1 min on 2 cores); cuda: bf16 at the paper's "
                        "shape (16 experts, d 1024, ffn 4096) with 4k, 16k and 64k tokens")
    p.add_argument("--quick", action="store_true",
                   help="a tiny shape with 1 repeat, for tests (seconds)")
    p.add_argument("--fractions", type=_float_list, default=None,
                   help="single-expert token fractions in [0, 1], comma-separated "
                        f"(default {','.join(map(str, DEFAULT_FRACTIONS))}; 0 = top-2 is always added)")
    p.add_argument("--tokens", type=_int_list, default=None,
                   help="token counts S per layer call, comma-separated (default: by device)")
    p.add_argument("--experts", type=int, default=None, help="number of experts E (default: by device)")
    p.add_argument("--dim", type=int, default=None, help="model dim d (default: by device)")
    p.add_argument("--ffn", type=int, default=None, help="expert FFN dim (default: by device)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter and activation dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations per case")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations per case (median)")
    p.add_argument("--implementations", default=None,
                   help="comma-separated subset of " + ",".join(IMPLEMENTATIONS) + " (default: all; "
                        "ours_trimmed only on cuda, since on cpu ours already trims its rows)")
    p.add_argument("--cpu-block-mib", type=int, default=ExpertFFN.cpu_block_bytes >> 20,
                   help="on CPU, compute the experts in row blocks of at most this many MiB of "
                        "FFN activations (0: one block)")
    p.add_argument("--cpu-pad-slack", type=float, default=ExpertFFN.pad_slack,
                   help="on CPU, compute the experts as one batched GEMM over groups padded to the "
                        "largest when it is at most this share larger than the mean (-1: never, "
                        "the grouped GEMMs always)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, inputs and routes")
    p.add_argument("--out", default="bench-out", help="directory for bench.json and bench.png")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        options = dict(vars(args))
        out = Path(options.pop("out"))
        cfg = make_config(**options)
    except BadFlag as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    meta = describe_run(cfg, device, shlex.join([PROG] + argv))
    print(format_header(cfg, meta))
    sys.stdout.flush()
    try:
        run = run_bench(cfg, device, meta, out)
    except AssertionError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    print(format_report(cfg, run))
    wrote = [run.write_json(out)]
    try:
        plot(run.records, meta, out / "bench.png")
        wrote.append(out / "bench.png")
    except ImportError:  # e.g. a bare GPU host: the JSON and the table are the record
        print("note: matplotlib is not installed: no bench.png")
    print(f"wrote {' and '.join(map(str, wrote))} ({meta['wall_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
