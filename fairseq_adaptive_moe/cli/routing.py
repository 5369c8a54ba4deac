"""``adaptive-moe-routing``: which tokens take two experts, layer by layer (paper §4.5, Figs. 1-2).

This module parses the flags and turns errors into an exit status (2 for bad input, after one
line on stderr and before any file is written); the analysis, and what each output file holds,
is :mod:`fairseq_adaptive_moe.tools.routing`.
"""

import argparse
import ast
import dataclasses
import logging
import shlex
import sys
from typing import Optional, Sequence

from ..tools.routing import BPE_MERGES, OUTPUT_FILES, PROG, InputError, RoutingOptions, analyse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Per-token routing analysis of an adaptive MoE checkpoint: two-expert share "
                    "per layer, expert load, the tokens that take two experts, per-token JSONL, "
                    "plots and a markdown report.")
    p.add_argument("data", metavar="DATA",
                   help="fairseq data-bin directory (dictionaries and binarized splits)")
    p.add_argument("--path", required=True, help="adaptive_moe_* checkpoint (.pt)")
    p.add_argument("--gen-subset", default="valid", help="the split to analyse")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per batch (4096 when neither this nor --max-sentences is given)")
    p.add_argument("--max-sentences", "--batch-size", type=int, default=None, dest="max_sentences",
                   help="sentences per batch")
    p.add_argument("--moe-eval-gating", choices=("train", "top1", "top2", "adaptive"), default=None,
                   help="gating for the analysis, a model override (default: the checkpoint's "
                        "--moe-eval-gating: top1, the paper's evaluation, unless it was trained "
                        "with another; 'train' shows the routing it was trained with)")
    p.add_argument("--model-overrides", default="{}",
                   help="python dict of model options to override, as in fairseq-generate, e.g. "
                        "\"{'moe_threshold': 0.05}\"")
    p.add_argument("--sample-tokens", type=int, default=48,
                   help="about how many tokens per side the top-k profile plot shows (whole "
                        "sentences drawn at random with --seed)")
    p.add_argument("--top-tokens", type=int, default=30,
                   help="how many of the most frequent two-expert tokens to list per side")
    p.add_argument("--bpe-merge", choices=BPE_MERGES, default="auto",
                   help="how pieces merge into words for the token lists ('none' lists pieces; "
                        "'auto' picks sentencepiece or subword_nmt from the dictionary)")
    p.add_argument("--seed", type=int, default=1, help="seed of the sentence sample")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    p.add_argument("--no-progress-bar", action="store_true", help="no progress bar")
    return p


def model_overrides(args) -> dict:
    """``--model-overrides`` (a python dict literal) with ``--moe-eval-gating``; InputError if
    it is not a dict."""
    try:
        overrides = ast.literal_eval(args.model_overrides)
    except (ValueError, SyntaxError):
        overrides = None
    if not isinstance(overrides, dict):
        raise InputError(f"--model-overrides must be a python dict literal, got "
                         f"{args.model_overrides!r}")
    if args.moe_eval_gating is not None:
        overrides["moe_eval_gating"] = args.moe_eval_gating
    return overrides


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        level=logging.INFO, stream=sys.stderr)
    options = RoutingOptions(**{f.name: getattr(args, f.name)
                                for f in dataclasses.fields(RoutingOptions)})
    try:
        summary = analyse(options, model_overrides(args), shlex.join([PROG] + argv))
    except InputError as e:
        if str(e):
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    o = summary["overall"]
    print(f"{PROG}: {summary['sentences']} sentences, {o['tokens']} token-layer routings, "
          f"{100 * o['two_expert_fraction']:.1f}% with 2+ experts; wrote "
          f"{', '.join(OUTPUT_FILES)} to {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
