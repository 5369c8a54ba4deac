#!/usr/bin/env python
"""Paper Table 6 at small scale: the complexity curriculum (``--moe-curriculum``) on and off.

Trains the tiny adaptive-gating MoE on a slice of Multi30k de-en twice, with the same seed and
flags: once in fairseq's order, once with the curriculum from epoch 2. Both use
``--task adaptive_moe_translation --moe-curriculum``; the fairseq-order run never starts it
(``--moe-curriculum-start-epoch 1000000``: fairseq's batches, as the tests check) but collects
the same statistics, so that the complexity of its batches is logged as well. Reported per run:

- the per-update time and its spread (``Trainer.train_step``: forward, backward, optimizer);
- the share of two-expert tokens per batch (``moe_2x`` of every update), the batch size, and
  from the task's per-epoch log the batches per epoch and the within-batch spread of the
  samples' two-expert shares;
- training wall time to the fixed number of updates, and to a fixed validation loss (the best
  loss both runs reach); validation time is left out of both, epoch-boundary work is in;
- sacreBLEU on the test set (beam 5) after the last update.

    python -m experiments.curriculum_table6 --out table6-out

Writes ``OUT/table6.md`` (the table) and ``OUT/table6.json``; the logs stay under ``OUT/<run>``.
CPU only. Timings are wall-clock; by default the two runs train at the same time, one thread
each, so that other load on the machine affects both alike (``--sequential`` runs them one after
the other with two threads each).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from . import ROOT, child_env, module_argv
from . import flags as fl
from . import paper

PROG = "curriculum_table6.py"
BIN = Path(sys.executable).parent
TRANSLATION = ROOT / "examples" / "translation"  # the user's prepare.py and score.py
SPREAD = re.compile(r"epoch (\d+) \|.*\| (\d+) batches \| batch 2x share min ([\d.]+) median "
                    r"([\d.]+) max ([\d.]+) \| within-batch std ([\d.]+)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k-deen",
                   help="raw {train,valid,test}.{de,en} (default: ../shared/data/multi30k-deen)")
    p.add_argument("--out", type=Path, default=ROOT / "table6-out", help="output directory")
    p.add_argument("--train-lines", type=int, default=8000, help="training pairs used (8000)")
    p.add_argument("--eval-lines", type=int, default=500, help="valid/test pairs used (500)")
    p.add_argument("--vocab-size", type=int, default=2000, help="sentencepiece vocabulary (2000)")
    p.add_argument("--max-update", type=int, default=600, help="updates per run (600)")
    p.add_argument("--max-tokens", type=int, default=2000, help="--max-tokens (2000)")
    p.add_argument("--validate-every", type=int, default=50,
                   help="validation interval in updates, for the time to a loss (50)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sequential", action="store_true",
                   help="run one after the other with 2 threads each; by default both run at the "
                        "same time with 1 thread each, so that other load on the machine hits "
                        "both alike")
    p.add_argument("--extra", default="", help="more fairseq-train flags for both runs")
    p.add_argument("--curriculum-flags", default="",
                   help="more flags for the curriculum run, "
                        "e.g. '--moe-curriculum-shuffle buckets'")
    return p.parse_args(argv)


def train_flags(args, data_bin, save_dir):
    return (fl.translation_recipe(data_bin, "adaptive_moe_transformer_tiny", "2e-3", 200,
                                  task="adaptive_moe_translation", weight_decay=None)
            + ["--max-tokens", str(args.max_tokens), "--max-update", str(args.max_update)]
            + fl.validation_flags(args.validate_every, never=1000) + ["--no-epoch-checkpoints"]
            + fl.device_flags(gpu=False) + ["--seed", str(args.seed), "--save-dir", str(save_dir)]
            + fl.log_flags(1) + args.extra.split())


def run(cmd, log=None):
    """Run ``cmd`` to the end; RuntimeError naming it (and its log) if it fails."""
    print("+ " + " ".join(map(str, cmd)), flush=True)
    with open(log or os.devnull, "w") as f:
        proc = subprocess.run(list(map(str, cmd)), stdout=f if log else None,
                              stderr=subprocess.STDOUT if log else None, text=True,
                              env=child_env())
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {cmd[0]}" + (f", see {log}" if log else ""))


def start(cmd, log, env):
    print("+ " + " ".join(map(str, cmd)), flush=True)
    return subprocess.Popen(list(map(str, cmd)), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, text=True)


def wait(proc, log):
    if proc.wait() != 0:
        raise RuntimeError(f"fairseq-train failed ({proc.returncode}), see {log}")


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(run_dir, curriculum_start):
    timing = [json.loads(x) for x in (run_dir / "timing.jsonl").read_text().splitlines()]
    steps = [t for t in timing if "step_s" in t]
    valids = [t for t in timing if "valid_loss" in t]
    records, curriculum = [], []
    for line in (run_dir / "train.log").read_text().splitlines():
        if "| train_inner | " in line:
            records.append(json.loads(line.split("| train_inner | ", 1)[1]))
        if "moe curriculum | epoch" in line:
            curriculum.append(line.split("moe curriculum | ", 1)[1])
    (run_dir / "curriculum.txt").write_text("".join(x + "\n" for x in curriculum))
    spread = [m.groups() for m in map(SPREAD.search, curriculum) if m]
    late_spread = [tuple(map(float, g[1:])) for g in spread if int(g[0]) >= curriculum_start]
    epoch_of = {int(r["num_updates"]): int(r["epoch"]) for r in records}
    step_s = [t["step_s"] for t in steps[1:]]  # the first update also builds caches
    late = [t["step_s"] for t in steps[1:] if epoch_of[t["update"]] >= curriculum_start]
    share = [float(r["moe_2x"]) for r in records]
    mean = statistics.mean(step_s)
    return {
        "updates": len(steps), "epochs": int(records[-1]["epoch"]),
        "step_ms_mean": 1000 * mean, "step_ms_std": 1000 * statistics.pstdev(step_s),
        "step_cv": statistics.pstdev(step_s) / mean,
        "step_ms_p5": 1000 * percentile(step_s, 0.05),
        "step_ms_p50": 1000 * percentile(step_s, 0.5),
        "step_ms_p95": 1000 * percentile(step_s, 0.95),
        "late_step_ms_mean": 1000 * statistics.mean(late) if late else None,
        "late_step_cv": statistics.pstdev(late) / statistics.mean(late) if late else None,
        "moe_2x_mean": statistics.mean(share), "moe_2x_std": statistics.pstdev(share),
        "moe_2x_min": min(share), "moe_2x_max": max(share),
        "tokens_per_batch": statistics.mean(float(r["wpb"]) for r in records),
        "sentences_per_batch": statistics.mean(float(r["bsz"]) for r in records),
        "train_wall_s": steps[-1]["train_wall_s"],
        # from the task's per-epoch log, epochs >= the curriculum's start epoch
        "batches_per_epoch": statistics.mean(x[0] for x in late_spread) if late_spread else None,
        "within_batch_std": statistics.mean(x[4] for x in late_spread) if late_spread else None,
        "epoch_batch_share_range": statistics.mean(x[3] - x[1] for x in late_spread)
        if late_spread else None,
        "valid": [(v["update"], v["valid_loss"], v["train_wall_s"]) for v in valids],
    }


def bleu(args, data_bin, run_dir):
    gen = run_dir / "gen.txt"
    run([BIN / "fairseq-generate", data_bin, "--user-dir", fl.USER_DIR,
         "--path", run_dir / "checkpoint_last.pt", "--gen-subset", "test", "--cpu", "--beam", "5",
         "--max-tokens", "8000", "--required-batch-size-multiple", "1",
         "--post-process", "sentencepiece"], log=gen)
    proc = subprocess.run([sys.executable, TRANSLATION / "score.py", gen,
                           data_bin / "raw" / "test.en", "--json"], capture_output=True, text=True,
                          check=True)
    return json.loads(proc.stdout)["bleu"]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return table6(args)
    except RuntimeError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


def table6(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    data_bin = args.out / "data-bin"
    run([sys.executable, TRANSLATION / "prepare.py", "--data", args.data, "--out", data_bin,
         "--vocab-size", args.vocab_size, "--max-train-lines", args.train_lines,
         "--max-eval-lines", args.eval_lines])

    # the first run trains in fairseq's order (the curriculum never starts; tests show the batches
    # are fairseq's), and collects the same statistics, so its batches' complexity is logged too
    runs = {"fairseq order": ["--moe-curriculum", "--moe-curriculum-start-epoch", "1000000"],
            "curriculum": ["--moe-curriculum"] + args.curriculum_flags.split()}
    start_epoch = 2
    if "--moe-curriculum-start-epoch" in args.curriculum_flags:
        flags = args.curriculum_flags.split()
        start_epoch = int(flags[flags.index("--moe-curriculum-start-epoch") + 1])
    dirs = {name: args.out / name.replace(" ", "-") for name in runs}
    children = {}
    for name, flags in runs.items():
        if dirs[name].exists():
            shutil.rmtree(dirs[name])
        dirs[name].mkdir(parents=True)
        env = child_env(OMP_NUM_THREADS="2" if args.sequential else "1")
        cmd = module_argv("timed_train", dirs[name] / "timing.jsonl",
                          *train_flags(args, data_bin, dirs[name]), *flags)
        children[name] = start(cmd, dirs[name] / "train.log", env)
        if args.sequential:
            wait(children[name], dirs[name] / "train.log")
    for name, child in children.items():
        wait(child, dirs[name] / "train.log")

    results = {}
    for name in runs:
        results[name] = summarize(dirs[name], start_epoch)
        results[name]["bleu"] = bleu(args, data_bin, dirs[name])

    # the fixed validation loss: the best loss that both runs reach
    target = max(min(v[1] for v in r["valid"]) for r in results.values())
    for r in results.values():
        first = next(v for v in r["valid"] if v[1] <= target)
        r["to_target"] = {"update": first[0], "train_wall_s": first[2]}
    report = render(args, results, target)
    (args.out / "table6.md").write_text(report)
    (args.out / "table6.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "target_valid_loss": target,
         "runs": results, "as_table6": as_table6(results),
         "paper_table6": {t: paper.table6(t) for t in ("translation", "summarization")}},
        indent=1))
    print(report)
    return 0


def opt(value, spec):
    return "-" if value is None else format(value, spec)


def render(args, results, target):
    names = list(results)
    rows = [
        ("epochs run", lambda r: f"{r['epochs']}"),
        ("update time, mean ± std (ms)",
         lambda r: f"{r['step_ms_mean']:.0f} ± {r['step_ms_std']:.0f}"),
        ("update time p5 / p50 / p95 (ms)",
         lambda r: f"{r['step_ms_p5']:.0f} / {r['step_ms_p50']:.0f} / {r['step_ms_p95']:.0f}"),
        ("update time CV (std/mean), all / epochs >= 2",
         lambda r: f"{r['step_cv']:.3f} / {r['late_step_cv']:.3f}" if r["late_step_cv"] is not None
         else f"{r['step_cv']:.3f} / -"),
        ("two-expert share per batch, mean ± std",
         lambda r: f"{r['moe_2x_mean']:.3f} ± {r['moe_2x_std']:.3f}"),
        ("two-expert share per batch, min / max",
         lambda r: f"{r['moe_2x_min']:.3f} / {r['moe_2x_max']:.3f}"),
        ("batches per epoch (epochs >= 2)", lambda r: opt(r["batches_per_epoch"], ".0f")),
        ("within-batch std of the samples' 2x share (epochs >= 2)",
         lambda r: opt(r["within_batch_std"], ".3f")),
        ("tokens / sentences per batch",
         lambda r: f"{r['tokens_per_batch']:.0f} / {r['sentences_per_batch']:.1f}"),
        (f"train wall to {args.max_update} updates (s)", lambda r: f"{r['train_wall_s']:.1f}"),
        (f"train wall to valid loss <= {target:.3f} (s, at update)",
         lambda r: f"{r['to_target']['train_wall_s']:.1f} (@{r['to_target']['update']})"),
        ("best valid loss", lambda r: f"{min(v[1] for v in r['valid']):.3f}"),
        (f"test BLEU ({args.eval_lines} sentences, beam 5)", lambda r: f"{r['bleu']:.2f}"),
    ]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(fmt(results[n]) for n in names) + " |"
              for label, fmt in rows]
    return "\n".join(lines + [""] + table6_lines(results)) + "\n"


def as_table6(results):
    """The measured figures as the paper's Table 6 gives them: the fairseq-order run (no
    curriculum) against the curriculum run, training time inflation (to N updates and to the
    target loss) and the BLEU change."""
    off, on = results["fairseq order"], results["curriculum"]
    return {"time_inflation": off["train_wall_s"] / on["train_wall_s"] - 1,
            "to_target_inflation": off["to_target"]["train_wall_s"]
            / on["to_target"]["train_wall_s"] - 1,
            "bleu_change": off["bleu"] - on["bleu"]}


def table6_lines(results):
    m = as_table6(results)
    row = paper.table6("translation")
    return ["Without the curriculum, against with it (paper Table 6's terms):", "",
            "| | training time inflation | BLEU change |", "|---|---|---|",
            f"| measured, to the last update | {m['time_inflation']:+.1%} | "
            f"{m['bleu_change']:+.2f} |",
            f"| measured, to the target loss | {m['to_target_inflation']:+.1%} | |",
            f"| paper, translation (WMT19, FSMT, 8 GPUs) | +{row['time_inflation']} | "
            f"{row['score_change']} |",
            f"| paper, summarization (CNN/DM, BART-Large) | "
            f"+{paper.table6('summarization')['time_inflation']} | "
            f"{paper.table6('summarization')['score_change']} (ROUGE-1) |"]


if __name__ == "__main__":
    sys.exit(main())
