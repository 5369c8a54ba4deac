#!/usr/bin/env python
"""One MoE layer called with a handful of rows (a decoding step: one sentence, beam 5), against a
dense FFN over the same rows, with the layer's CPU small-call path on and off.

At each ``--used`` count k, the gate is set so that the ``--rows`` rows go to exactly k experts
(row r to expert r mod k), top-1 inference, no gradients. Three things are timed, interleaved
round by round (``--rounds`` rounds of ``--calls`` calls each, the median round reported):

- ``small-call path``: the layer as it runs (``ExpertFFN.loops_small_calls``: one ``addmm``
  pair per expert that has rows);
- ``grouped path``: the same layer with the small-call path off (the grouped GEMMs over every
  expert, fc1's bias added to their output);
- ``dense``: ``fc2(relu(fc1(x)))`` over the same rows.

At k = 1 the layer does the dense FFN's FLOPs and reads one expert's weights, as many bytes as
the dense FFN's: what it takes beyond the dense time is the fixed cost of routing, dispatch and
combine. Writes ``OUT/small_calls.md`` and ``OUT/small_calls.json``.

    python -m experiments.small_calls --out small-out
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROG = "small_calls.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--rows", type=int, default=5, help="rows per call (5: one sentence, beam 5)")
    p.add_argument("--used", default="1,2,3,5", help="experts the rows go to, comma-separated")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--calls", type=int, default=150, help="calls per round (150)")
    p.add_argument("--rounds", type=int, default=15, help="rounds, interleaved (15)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    try:
        args.used = [int(v) for v in args.used.split(",") if v]
    except ValueError:
        p.error(f"--used: comma-separated integers, got {args.used!r}")
    for name in ("rows", "experts", "dim", "ffn", "calls", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    bad = [k for k in args.used if not 1 <= k <= min(args.rows, args.experts)]
    if bad or not args.used:
        p.error(f"--used must lie in [1, min(--rows, --experts)], got {bad or args.used}")
    return args


def measure(args) -> list:
    import torch
    import torch.nn as nn

    from fairseq_adaptive_moe.moe import ExpertFFN, MoELayer, TopKGate

    torch.manual_seed(0)
    layer = MoELayer(TopKGate(args.dim, args.experts, policy="adaptive", eval_policy="top1"),
                     ExpertFFN(args.experts, args.dim, args.ffn, seed=0)).eval()
    dense = nn.Sequential(nn.Linear(args.dim, args.ffn), nn.ReLU(),
                          nn.Linear(args.ffn, args.dim)).eval()
    results = []
    with torch.no_grad():
        for k in args.used:
            x = torch.randn(args.rows, args.dim)
            gate = torch.zeros(args.experts, args.dim)
            for r in range(args.rows):
                gate[r % k] += 10 * x[r]  # row r's logit is largest at expert r mod k
            layer.gate.wg.weight.copy_(gate)
            _, stats = layer(x)
            got = int((stats.expert_load > 0).sum())
            if got != k:
                raise RuntimeError(f"the crafted gate sends the rows to {got} experts, wanted {k}")

            def timed(fn) -> float:
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                return (time.perf_counter() - t0) / args.calls * 1e6

            def moe(loop: bool):
                def call():
                    layer.experts.loops_small_calls = loop
                    return timed(lambda: layer(x))
                return call

            cases = {"small-call path": moe(True), "grouped path": moe(False),
                     "dense": lambda: timed(lambda: dense(x))}
            for fn in cases.values():  # warm-up
                fn()
            samples = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, fn in cases.items():
                    samples[name].append(fn())
            layer.experts.loops_small_calls = True
            med = {name: statistics.median(v) for name, v in samples.items()}
            results.append({"used": k, "us": med, "samples_us": samples})
    return results


def render(args, argv, results) -> str:
    lines = [f"# One MoE layer, {args.rows} rows a call: the small-call path against the grouped "
             "path and a dense FFN", "",
             f"`python -m experiments.small_calls {' '.join(argv)}`", "",
             f"{args.experts} experts, d {args.dim}, FFN {args.ffn}, fp32, top-1 inference, no "
             f"gradients, {args.threads} threads; median of {args.rounds} interleaved rounds of "
             f"{args.calls} calls (microseconds a call).", "",
             "| experts used | small-call path | grouped path | dense | small-call / grouped | "
             "small-call / dense |", "|---|---|---|---|---|---|"]
    for r in results:
        us = r["us"]
        lines.append(f"| {r['used']} | {us['small-call path']:.0f} | {us['grouped path']:.0f} | "
                     f"{us['dense']:.0f} | {us['small-call path'] / us['grouped path']:.2f} | "
                     f"{us['small-call path'] / us['dense']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    report = render(args, argv, results)
    (args.out / "small_calls.md").write_text(report)
    (args.out / "small_calls.json").write_text(json.dumps({"argv": argv, "results": results},
                                                          indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
