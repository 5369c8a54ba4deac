#!/usr/bin/env python
"""Where an MoE layer's time goes, against a dense FFN over the same rows (torch.profiler).

At each shape of ``--shapes`` (``E:d:ffn:tokens``; default the CPU bench shape 8:256:1024:4096
and the small model's 8:512:2048:2048), with exactly a fraction ``--fraction`` of single-expert
tokens (1.0: every token on one expert, the dense FFN's FLOPs; the routing is crafted as in
``adaptive-moe-bench``), runs ``--repeats`` forward+backward passes of

- ``ours``: the gate linear and ``MoELayer.apply_experts`` (route, dispatch, grouped GEMMs,
  combine), as the bench times it;
- ``dense``: one dense FFN (fc1, ReLU, fc2) over the same rows,

under ``torch.profiler`` and sums each op's self CPU time into categories: GEMMs; gathers,
scatters and copies; sort and search; element-wise and reductions; allocation. The profiler
adds a little to every op, so the small ops weigh more here than in the bench's timings; the
categories say where the difference lies. Prints the table and each implementation's top ops;
writes ``OUT/profile.md`` and ``OUT/profile.json``.

    python -m experiments.profile_layer --out profile-out
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

PROG = "profile_layer.py"
CATEGORIES = [
    ("GEMM", ("mm", "_grouped_mm", "addmm", "bmm", "baddbmm", "matmul", "linear")),
    ("gather / scatter / copy", ("index_select", "index_add_", "index_add", "index_put_",
                                 "index_put", "_index_put_impl_", "cat", "copy_", "gather",
                                 "scatter", "scatter_add_", "where", "clone", "contiguous",
                                 "_to_copy", "embedding_dense_backward", "index")),
    ("sort / search / top-k", ("argsort", "sort", "searchsorted", "topk")),
    ("allocation", ("empty", "empty_strided", "zeros", "new_zeros", "zeros_like", "new_empty",
                    "fill_", "zero_", "ones", "full", "arange")),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--shapes", default="8:256:1024:4096,8:512:2048:2048",
                   help="comma-separated E:d:ffn:tokens")
    p.add_argument("--fraction", type=float, default=1.0, help="single-expert tokens (1.0)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12, help="ops listed per implementation (12)")
    p.add_argument("--fold-rows-divisor", type=int, default=None,
                   help="ExpertFFN.fold_rows_divisor for this run: fc1's bias is folded into its "
                        "GEMM from E*d/divisor rows on (default: the layer's own)")
    p.add_argument("--pad-slack", type=float, default=None,
                   help="ExpertFFN.pad_slack for this run: near-even groups are padded and batched "
                        "when the largest is at most this share above the mean; -1: never, the "
                        "grouped GEMMs (default: the layer's own)")
    args = p.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",") if s]
        if not args.shapes or any(len(s) != 4 or min(s) < 1 for s in args.shapes):
            raise ValueError
    except ValueError:
        p.error(f"--shapes: E:d:ffn:tokens, comma-separated, got {args.shapes!r}")
    if not 0 <= args.fraction <= 1:
        p.error(f"--fraction must lie in [0, 1], got {args.fraction}")
    return args


def category(op: str) -> str:
    name = op.split("::", 1)[-1]
    for label, names in CATEGORIES:
        if name in names:
            return label
    return "element-wise / reduction / other"


def profile(fn, x, grad, repeats):
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(2):  # warm-up
        fn(x).backward(grad)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn(x).backward(grad)
    ops = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith(("aten::", "autograd::")) or "Backward" in event.key:
            ops[event.key] += event.self_cpu_time_total / 1e3 / repeats  # ms per fwd+bwd
    total = sum(ops.values())
    by_category = defaultdict(float)
    for op, ms in ops.items():
        by_category[category(op)] += ms
    return {"total_ms": total, "categories": dict(by_category),
            "top": sorted(ops.items(), key=lambda kv: -kv[1])}


def measure_shape(shape, fraction, repeats):
    import torch
    import torch.nn as nn

    from fairseq_adaptive_moe.moe import ExpertFFN, MoELayer, TopKGate
    from fairseq_adaptive_moe.tools.bench import THRESHOLD, craft_decision, live_gate

    experts, dim, ffn, tokens = shape
    torch.manual_seed(0)
    layer = MoELayer(TopKGate(dim, experts, policy="adaptive", threshold=THRESHOLD),
                     ExpertFFN(experts, dim, ffn, seed=0))
    decision = craft_decision(tokens, experts, fraction, 1, torch.device("cpu"))
    rows = int(decision.used.sum())
    x = torch.randn(tokens, dim, requires_grad=True)
    grad = torch.randn(tokens, dim)
    fc1, fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
    x_dense = torch.randn(rows, dim, requires_grad=True)
    grad_dense = torch.randn(rows, dim)

    def ours(inp):
        return layer.apply_experts(inp, live_gate(inp, layer.gate.wg.weight, decision))[0]

    def dense(inp):
        return fc2(torch.relu(fc1(inp)))

    return {"shape": dict(experts=experts, dim=dim, ffn=ffn, tokens=tokens, rows=rows),
            "ours": profile(ours, x, grad, repeats),
            "dense": profile(dense, x_dense, grad_dense, repeats)}


def render(args, argv, results) -> str:
    labels = [c for c, _ in CATEGORIES] + ["element-wise / reduction / other"]
    lines = [f"# MoE layer against a dense FFN over the same rows: where the time goes "
             f"(f = {args.fraction:g})", "",
             f"`python -m experiments.profile_layer {' '.join(argv)}`", "",
             "Self CPU time per forward+backward (ms), from torch.profiler, summed by category.", ""]
    for r in results:
        s = r["shape"]
        lines += [f"## {s['experts']} experts, d {s['dim']}, FFN {s['ffn']}, {s['tokens']} tokens "
                  f"({s['rows']} rows)", "",
                  "| category | ours | dense | ours - dense |", "|---|---|---|---|"]
        for label in labels + ["total"]:
            a = r["ours"]["total_ms"] if label == "total" else r["ours"]["categories"].get(label, 0)
            b = r["dense"]["total_ms"] if label == "total" else r["dense"]["categories"].get(label, 0)
            lines.append(f"| {label} | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
        for impl in ("ours", "dense"):
            lines += ["", f"Top ops, {impl}: " + ", ".join(
                f"{op} {ms:.1f}" for op, ms in r[impl]["top"][:args.top])]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from fairseq_adaptive_moe.moe import ExpertFFN

    if args.fold_rows_divisor is not None:
        ExpertFFN.fold_rows_divisor = args.fold_rows_divisor
    if args.pad_slack is not None:
        ExpertFFN.pad_slack = args.pad_slack
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure_shape(s, args.fraction, args.repeats) for s in args.shapes]
    report = render(args, argv, results)
    (args.out / "profile.md").write_text(report)
    (args.out / "profile.json").write_text(json.dumps({"argv": argv, "results": results},
                                                      indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
