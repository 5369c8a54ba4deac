#!/usr/bin/env python
"""The curriculum where its saving would come from: rank imbalance under data and expert
parallelism, against fairseq's order and a random loader, over seeds.

Trains the tiny adaptive-gating MoE on a slice of Multi30k de-en, once per (setup, order, seed):

- setups: ``dp2`` (2 gloo ranks, data parallel), ``ep2`` (2 gloo ranks, experts spread over
  both, ``--moe-expert-parallel-size 2``), ``single`` (one process);
- orders: ``fairseq`` (fairseq's length-bucketed, shuffled batches; the curriculum collects its
  statistics but never starts), ``curriculum`` (the default curriculum from epoch 2, or the
  flags of ``--curriculum-flags``), ``curriculum-wN`` / ``curriculum-bN`` / ``curriculum-cosine``
  (the same with ``--moe-curriculum-window N`` / ``--moe-curriculum-balance-steps N`` /
  ``--moe-curriculum-order cosine``), ``random`` (a random loader, the paper's baseline: ``--moe-curriculum-order random
  --moe-curriculum-window 0`` from epoch 1).

Every rank has ``--max-tokens`` per batch and one thread; the ranks of one run share the 2 cores
of a small machine, and runs go one after the other, seed by seed with every order in turn, so
that a machine whose speed drifts over the sweep slows every order alike. Reported per run, and as mean ± sd over the
seeds:

- rank imbalance: fairseq's ``moe_rank_imbalance`` of every update (the busiest rank's MoE slots,
  tokens times experts, over the mean over ranks), mean and p95 over the updates of the
  curriculum epochs (epoch >= 2), and over all updates;
- update time (``Trainer.train_step`` on rank 0, which waits for the slowest rank at the
  gradient all-reduce), mean over the same updates; with expert parallelism, the time a rank
  waits at the MoE layers' all-to-all (``moe_a2a_wait_ms``);
- batches per epoch and tokens per update; training wall time to the last update and to a target
  validation loss (the worst of all runs' best losses, so every run reaches it);
- sacreBLEU on the test set under top-1 gating (the paper's protocol; data-parallel and single
  runs; an expert-parallel checkpoint is sharded and is not scored here).

    python -m experiments.curriculum_ranks --out ranks-out

Writes ``OUT/ranks.md`` and ``OUT/ranks.json``; each run's logs stay under ``OUT/runs/``. A run
whose ``result.json`` exists with the same command is reused (``--force`` reruns).
"""

import argparse
import json
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

from . import ROOT, child_env, module_argv
from . import flags as fl
from . import paper
from .curriculum_table6 import SPREAD, bleu, percentile, run

PROG = "curriculum_ranks.py"
BIN = Path(sys.executable).parent
TRANSLATION = ROOT / "examples" / "translation"
SETUPS = ("dp2", "ep2", "single")
ORDERS = {
    "fairseq": ["--moe-curriculum", "--moe-curriculum-start-epoch", "1000000"],
    "curriculum": ["--moe-curriculum"],
    "random": ["--moe-curriculum", "--moe-curriculum-order", "random", "--moe-curriculum-window",
               "0", "--moe-curriculum-start-epoch", "1"],
}


class BadInput(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k-deen",
                   help="raw {train,valid,test}.{de,en} (default: ../shared/data/multi30k-deen)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--setups", default="dp2,ep2,single", help=f"comma-separated, of {SETUPS}")
    p.add_argument("--orders", default="fairseq,curriculum,random",
                   help=f"comma-separated, of {tuple(ORDERS)}, curriculum-wN, curriculum-bN, "
                        "curriculum-cosine")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (1,2,3)")
    p.add_argument("--single-seeds", default=None,
                   help="seeds of the single-process and expert-parallel runs (default: --seeds)")
    p.add_argument("--train-lines", type=int, default=8000, help="training pairs used (8000)")
    p.add_argument("--eval-lines", type=int, default=500, help="valid/test pairs used (500)")
    p.add_argument("--vocab-size", type=int, default=2000, help="sentencepiece vocabulary (2000)")
    p.add_argument("--max-update", type=int, default=400, help="updates per run (400)")
    p.add_argument("--max-tokens", type=int, default=2000, help="--max-tokens per rank (2000)")
    p.add_argument("--validate-every", type=int, default=50, help="validation interval (50)")
    p.add_argument("--curriculum-flags", default="",
                   help="more flags for the curriculum runs, e.g. '--moe-curriculum-order cosine'")
    p.add_argument("--extra", default="", help="more fairseq-train flags for every run")
    p.add_argument("--no-bleu", action="store_true", help="skip test-set generation")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    args = p.parse_args(argv)
    args.setups = [s for s in args.setups.split(",") if s]
    args.orders = [o for o in args.orders.split(",") if o]
    bad = [s for s in args.setups if s not in SETUPS] + [o for o in args.orders
                                                         if order_flags(o) is None]
    if bad or not args.setups or not args.orders:
        raise BadInput(f"unknown setup or order {bad}; setups {SETUPS}, orders {tuple(ORDERS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
        args.single_seeds = args.seeds if args.single_seeds is None else \
            [int(s) for s in args.single_seeds.split(",") if s]
    except ValueError:
        raise BadInput(f"--seeds / --single-seeds: integers, got {args.seeds!r}") from None
    if not args.seeds or not args.single_seeds:
        raise BadInput("--seeds: at least one seed")
    if not (args.data / "train.de").is_file():
        raise BadInput(f"--data {args.data}: no train.de (a folder with Multi30k de-en's raw files)")
    return args


def order_flags(order: str):
    """The flags of an order name, None for an unknown one: ``fairseq``, ``random``,
    ``curriculum``, or ``curriculum`` with suffixes ``-wN`` (``--moe-curriculum-window N``),
    ``-bN`` (``--moe-curriculum-balance-steps N``) and ``-mean`` / ``-cosine``
    (``--moe-curriculum-order``), e.g. ``curriculum-cosine-w4``, ``curriculum-b8``."""
    if order in ORDERS:
        return ORDERS[order]
    head, *parts = order.split("-")
    if head != "curriculum" or not parts:
        return None
    flags = list(ORDERS["curriculum"])
    for part in parts:
        if part[:1] == "w" and part[1:].isdigit():
            flags += ["--moe-curriculum-window", part[1:]]
        elif part[:1] == "b" and part[1:].isdigit():
            flags += ["--moe-curriculum-balance-steps", part[1:]]
        elif part in ("mean", "cosine"):
            flags += ["--moe-curriculum-order", part]
        else:
            return None
    return flags


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args, data_bin, run_dir, setup, order, seed) -> list:
    flags = (fl.translation_recipe(data_bin, "adaptive_moe_transformer_tiny", "2e-3", 200,
                                   task="adaptive_moe_translation", weight_decay=None)
             + ["--max-tokens", str(args.max_tokens), "--max-update", str(args.max_update)]
             + fl.validation_flags(args.validate_every, never=1000) + ["--no-epoch-checkpoints"]
             + fl.device_flags(gpu=False) + ["--seed", str(seed), "--save-dir", str(run_dir)]
             + fl.log_flags(1) + order_flags(order)
             + (shlex.split(args.curriculum_flags) if order.startswith("curriculum") else [])
             + shlex.split(args.extra))
    if setup == "single":
        return module_argv("timed_train", run_dir / "timing.jsonl") + flags
    if setup == "ep2":
        flags += ["--moe-expert-parallel-size", "2"]
    return ([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())]
            + ["-m", "experiments.timed_train", str(run_dir / "timing.jsonl")] + flags
            + ["--ddp-backend", "legacy_ddp"])


def summarize(run_dir: Path) -> dict:
    timing = [json.loads(x) for x in (run_dir / "timing.jsonl").read_text().splitlines()]
    steps = [t for t in timing if "step_s" in t]
    valids = [t for t in timing if "valid_loss" in t]
    records, spread = [], []
    for line in (run_dir / "train.log").read_text().splitlines():
        if "| train_inner | " in line:
            records.append(json.loads(line.split("| train_inner | ", 1)[1]))
        match = SPREAD.search(line) if "moe curriculum | epoch" in line else None
        if match:
            spread.append((int(match.group(1)), int(match.group(2))))
    epoch_of = {int(r["num_updates"]): int(r["epoch"]) for r in records}
    late = {u for u, e in epoch_of.items() if e >= 2}
    imbalance = {int(r["num_updates"]): float(r["moe_rank_imbalance"]) for r in records
                 if "moe_rank_imbalance" in r}
    late_imb = [v for u, v in imbalance.items() if u in late]
    wait = [float(r["moe_a2a_wait_ms"]) for r in records
            if "moe_a2a_wait_ms" in r and int(r["num_updates"]) in late]
    late_steps = [t["step_s"] for t in steps[1:] if t["update"] in late]
    return {
        "updates": len(steps), "epochs": max(epoch_of.values()),
        "imbalance_mean": statistics.mean(late_imb) if late_imb else None,
        "imbalance_p95": percentile(late_imb, 0.95) if late_imb else None,
        "imbalance_mean_all": statistics.mean(imbalance.values()) if imbalance else None,
        "a2a_wait_ms": statistics.mean(wait) if wait else None,
        "step_ms_mean": 1000 * statistics.mean(late_steps) if late_steps else None,
        "tokens_per_update": statistics.mean(float(r["wpb"]) for r in records),
        "batches_per_epoch": statistics.mean(n for e, n in spread if e >= 2) if spread else None,
        "moe_2x": statistics.mean(float(r["moe_2x"]) for r in records),
        "train_wall_s": steps[-1]["train_wall_s"],
        "valid": [(v["update"], v["valid_loss"], v["train_wall_s"]) for v in valids],
        "best_valid_loss": min(v["valid_loss"] for v in valids),
    }


def one_run(args, data_bin, setup, order, seed) -> dict:
    name = f"{setup}-{order}-s{seed}"
    run_dir = args.out / "runs" / name
    cmd = command(args, data_bin, run_dir, setup, order, seed)
    saved = run_dir / "result.json"
    # what identifies the run: its command without the port, which changes from run to run
    key = shlex.join(c for i, c in enumerate(cmd) if i == 0 or cmd[i - 1] != "--master_port")
    if saved.is_file() and not args.force:
        result = json.loads(saved.read_text())
        if result.get("command") == key:
            print(f"[{name}] reused", flush=True)
            return result
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    log = run_dir / "train.log"
    print(f"[{name}] + {shlex.join(cmd)}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                            env=child_env(threads=1)).returncode
    if rc != 0:
        raise RuntimeError(f"{name} failed ({rc}), see {log}")
    result = dict(summarize(run_dir), name=name, setup=setup, order=order, seed=seed,
                  command=key)
    result["bleu_top1"] = None
    if setup != "ep2" and not args.no_bleu:
        result["bleu_top1"] = bleu(args, data_bin, run_dir)  # the default eval gating: top-1
    saved.write_text(json.dumps(result, indent=1))
    return result


def mean_sd(values, spec):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def render(args, results, target) -> str:
    lines = [f"# Curriculum and rank imbalance (tiny model, {args.max_update} updates)", "",
             f"`python -m experiments.curriculum_ranks {' '.join(args.argv)}`", "",
             f"Target valid loss (the worst of the runs' best): {target:.3f}. Figures over the "
             "updates of epochs >= 2 (the curriculum's), mean ± sd over seeds.", "",
             "| setup | order | seeds | rank imbalance mean | rank imbalance p95 | update ms | "
             "all-to-all wait ms | batches / epoch | tokens / update | time to last update (s) "
             "| time to target (s) | BLEU, top-1 | 2x share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for setup in args.setups:
        for order in args.orders:
            rs = [r for r in results if r["setup"] == setup and r["order"] == order]
            if not rs:
                continue
            lines.append(
                f"| {setup} | {order} | {len(rs)} | {mean_sd([r['imbalance_mean'] for r in rs], '.3f')} "
                f"| {mean_sd([r['imbalance_p95'] for r in rs], '.3f')} "
                f"| {mean_sd([r['step_ms_mean'] for r in rs], '.0f')} "
                f"| {mean_sd([r.get('a2a_wait_ms') for r in rs], '.1f')} "
                f"| {mean_sd([r['batches_per_epoch'] for r in rs], '.0f')} "
                f"| {mean_sd([r['tokens_per_update'] for r in rs], '.0f')} "
                f"| {mean_sd([r['train_wall_s'] for r in rs], '.1f')} "
                f"| {mean_sd([r['to_target_s'] for r in rs], '.1f')} "
                f"| {mean_sd([r['bleu_top1'] for r in rs], '.2f')} "
                f"| {mean_sd([r['moe_2x'] for r in rs], '.3f')} |")
    row = paper.table6("translation")
    lines += ["", f"Paper Table 6, translation (WMT19 de-en, 8 GPUs, against a random loader): "
              f"without the curriculum +{row['time_inflation']} training time, BLEU "
              f"{row['score_change']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except BadInput as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    args.argv = argv
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    data_bin = args.out / "data-bin"
    try:
        if not (data_bin / "dict.en.txt").is_file():
            run([sys.executable, TRANSLATION / "prepare.py", "--data", args.data, "--out",
                 data_bin, "--vocab-size", args.vocab_size, "--max-train-lines",
                 args.train_lines, "--max-eval-lines", args.eval_lines])
        results = []
        for setup in args.setups:  # seed by seed, every order in turn: the machine's drift
            for seed in args.seeds if setup == "dp2" else args.single_seeds:  # hits them alike
                for order in args.orders:
                    results.append(one_run(args, data_bin, setup, order, seed))
    except RuntimeError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    target = max(r["best_valid_loss"] for r in results)
    for r in results:
        first = next(v for v in r["valid"] if v[1] <= target)
        r["to_target_s"], r["to_target_update"] = first[2], first[0]
    report = render(args, results, target)
    (args.out / "ranks.md").write_text(report)
    (args.out / "ranks.json").write_text(json.dumps(
        {"argv": argv, "target_valid_loss": target, "runs": results}, indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
