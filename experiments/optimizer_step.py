#!/usr/bin/env python
"""The optimizer step of an MoE model against the same model with dense FFNs: it scales with the
parameters (E times the FFN's), not with the FLOPs, so top-1 routing cannot save it.

Builds ``--arch`` (default ``adaptive_moe_transformer_small``: 3+3 layers, d 512, FFN 2048,
8 experts) twice, as the MoE and with ``--moe-freq 0`` (dense FFNs), gives every parameter a
random gradient and times ``step()`` of each Adam implementation on each model (median of
``--repeats`` after 2 warm-up steps, ``--threads`` threads):

- ``fairseq``: fairseq's ``--optimizer adam`` (its own Adam, a loop over parameters; decoupled
  weight decay);
- ``torch_foreach``: ``torch.optim.AdamW(foreach=True)``, the same update;
- ``torch_fused``: ``torch.optim.AdamW(fused=True)``, where this torch has a fused kernel for the
  device.

    python -m experiments.optimizer_step --out opt-out
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from . import compare

PROG = "optimizer_step.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--arch", default="adaptive_moe_transformer_small")
    p.add_argument("--vocab", type=int, default=4000, help="dictionary size (4000)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def build(arch: str, vocab: int, extra: list):
    import torch
    from fairseq import options, tasks
    from fairseq.data import Dictionary

    import fairseq_adaptive_moe  # noqa: F401  (registers the architectures)

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        "/nonexistent", "--arch", arch, "--task", "translation", "--share-all-embeddings",
        "--source-lang", "de", "--target-lang", "en", *extra])
    d = Dictionary()
    for i in range(vocab - len(d)):
        d.add_symbol(f"w{i}")
    task = tasks.translation.TranslationTask(args, d, d)
    model = task.build_model(args)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def adam_impls(params):
    import torch
    from fairseq.optim.adam import Adam as FairseqAdam

    kw = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=1e-4)
    impls = {"fairseq": lambda: FairseqAdam(params, **kw),
             "torch_foreach": lambda: torch.optim.AdamW(params, foreach=True, **kw)}
    try:
        torch.optim.AdamW(params, fused=True, **kw)
        impls["torch_fused"] = lambda: torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        pass
    return impls


def time_steps(make, repeats: int) -> float:
    opt = make()
    for _ in range(2):
        opt.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, extra in (("moe", []), ("dense", ["--moe-freq", "0"])):
        model = build(args.arch, args.vocab, extra)
        params = [p for p in model.parameters() if p.requires_grad]
        expert = sum(p.numel() for p in params if getattr(p, "moe_expert", False))
        results[name] = {"params": sum(p.numel() for p in params), "expert_params": expert,
                         "step_ms": {k: time_steps(make, args.repeats)
                                     for k, make in adam_impls(params).items()}}
        print(name, results[name], flush=True)
    impls = list(results["moe"]["step_ms"])
    lines = [f"# Optimizer step: MoE against dense FFNs (`{args.arch}`)", "",
             f"`python -m experiments.optimizer_step {' '.join(argv)}`", "",
             f"Machine: {compare.machine(False)}; {args.threads} threads; median of "
             f"{args.repeats} steps.", "",
             "| model | parameters | of them experts | " + " | ".join(f"{i} ms" for i in impls)
             + " |", "|---|---|---|" + "---|" * len(impls)]
    for name, r in results.items():
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['expert_params'] / 1e6:.1f}M | "
                     + " | ".join(f"{r['step_ms'][i]:.0f}" for i in impls) + " |")
    lines.append("| moe / dense | " + f"{results['moe']['params'] / results['dense']['params']:.2f}x"
                 + " | | " + " | ".join(
                     f"{results['moe']['step_ms'][i] / results['dense']['step_ms'][i]:.2f}x"
                     for i in impls) + " |")
    report = "\n".join(lines) + "\n"
    (args.out / "optimizer.md").write_text(report)
    (args.out / "optimizer.json").write_text(json.dumps({"argv": argv, "results": results},
                                                        indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
