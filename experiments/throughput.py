#!/usr/bin/env python
"""End-to-end training throughput: words/s of adaptive gating against top-2, and the MoE layers'
share of the step.

Each scheme trains with identical fairseq-train flags except the gating (``experiments.flags``,
as in ``experiments.compare``), in its own process through ``experiments.timed_train
--moe-timing``, one after the other:

- words/s: target tokens (fairseq's ``wps`` numerator) over the summed ``Trainer.train_step``
  wall time of the updates after the first ``--skip`` (start-up, allocator and cuDNN warm-up);
- MoE ms per update, forward and backward, and their share of the step
  (``fairseq_adaptive_moe.moe.MoETimer``; on CUDA one sync per update reads its events);
- the share of tokens that took two experts, from fairseq's own ``moe_2x`` log over the same
  updates (json ``train_inner`` records);
- the ratio to the first scheme's words/s (top-2 by default).

Adaptive gating only saves time once the gate is confident: at initialisation nearly every
token's top two probabilities are within T of each other, so nearly all take two experts. Train
long enough (``--max-update``, ``--skip``) that the measured window's two-expert share is the
one training settles at; the table prints it beside every figure.
``--windows N`` adds a table over consecutive windows of N updates, which shows the speed-up
growing as the gate settles; ``--reuse-runs`` rewrites the tables from the runs already on disk.

    python -m experiments.throughput --data-bin data-bin --out tp-out --max-update 200 --skip 100
    python -m experiments.throughput --data-bin data-bin --out tp-gpu --gpu \\
        --arch adaptive_moe_transformer_wmt19_de_en --max-tokens 8192 --max-update 300 --skip 200

``--time-budget SECONDS`` trains each scheme for that long instead (fairseq's
``--stop-time-hours``, capped by ``--max-update``), so that a run of the whole suite takes a known
time; the figures then cover the updates that every scheme reached.

Writes ``OUT/throughput.md``, ``OUT/throughput.json`` and each run's ``train.log`` and
``timing.jsonl`` under ``OUT/runs/SCHEME/``. Bad input: one line on stderr, exit status 2,
nothing written.
"""

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from . import compare  # fairseq json log records, the machine line, the children's environment
from . import flags as fl
from . import module_argv
from .flags import SCHEMES

PROG = "throughput.py"


class BadInput(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        raise BadInput(message)


def parse_args(argv=None):
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--data-bin", type=Path, required=True,
                   help="a data-bin from examples/translation/prepare.py")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--schemes", default="top2,adaptive",
                   help="comma-separated, the first is the reference (top2,adaptive)")
    p.add_argument("--threshold", type=float, default=0.1, help="adaptive threshold T (0.1)")
    p.add_argument("--arch", default="adaptive_moe_transformer_tiny")
    p.add_argument("--max-update", type=int, default=200)
    p.add_argument("--time-budget", type=float, default=0.0, metavar="SECONDS",
                   help="train each scheme for this many seconds of fairseq's training time "
                        "(--stop-time-hours), up to --max-update; every figure then covers the "
                        "updates that all schemes reached (0: off, train --max-update updates)")
    p.add_argument("--skip", type=int, default=100,
                   help="updates left out of every figure, counted from the start (100)")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-updates", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--gpu", action="store_true",
                   help="train on the GPU with --fp16 (default: --cpu, fp32)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run (2)")
    p.add_argument("--extra", default="", help="more fairseq-train flags, the same for every run")
    p.add_argument("--windows", type=int, default=0,
                   help="also tabulate every scheme over consecutive windows of this many updates, "
                        "from the first: how the speed-up grows as the gate settles (0: off)")
    p.add_argument("--reuse-runs", action="store_true",
                   help="rewrite OUT/throughput.md and .json from the runs already in OUT/runs/ "
                        "(trained with these same flags) instead of training again, e.g. with "
                        "other --skip or --windows")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT/throughput.json")
    return p.parse_args(argv)


def check(args):
    if not (args.data_bin / "dict.en.txt").exists() and not list(args.data_bin.glob("dict.*.txt")):
        raise BadInput(f"--data-bin {args.data_bin}: no dict.*.txt (run prepare.py first)")
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
        raise BadInput(f"--schemes: unknown {bad or schemes}; choose from {', '.join(SCHEMES)}")
    if len(set(schemes)) != len(schemes):
        raise BadInput(f"--schemes names a scheme twice: {args.schemes}")
    if args.max_update < 1 or not 0 <= args.skip < args.max_update:
        raise BadInput(f"need 0 <= --skip < --max-update, got {args.skip} and {args.max_update}")
    if args.windows < 0:
        raise BadInput(f"--windows must be >= 0, got {args.windows}")
    if not args.time_budget >= 0:  # also NaN
        raise BadInput(f"--time-budget must be >= 0 seconds, got {args.time_budget}")
    if not 0 <= args.threshold <= 1:
        raise BadInput(f"--threshold must lie in [0, 1], got {args.threshold}")
    if args.reuse_runs:
        check_reusable(args, schemes)
    elif (args.out / "throughput.json").exists() and not args.force:
        raise BadInput(f"{args.out / 'throughput.json'} exists (--force to overwrite)")
    try:
        shlex.split(args.extra)
    except ValueError as err:
        raise BadInput(f"--extra: {err}")
    return schemes


def run_files(args, scheme):
    """A scheme's run directory, its per-update timing and its fairseq log."""
    run = args.out / "runs" / scheme
    return run, run / "timing.jsonl", run / "train.log"


def run_command(args, scheme) -> list:
    run, timing, _ = run_files(args, scheme)
    return module_argv("timed_train", "--moe-timing", timing) + train_flags(args, scheme, run)


def check_reusable(args, schemes):
    """--reuse-runs: every run finished (throughput.json was written) with the flags given now."""
    if not (args.out / "throughput.json").exists():
        raise BadInput(f"--reuse-runs: {args.out / 'throughput.json'} is missing (no finished runs)")
    for s in schemes:
        saved = run_files(args, s)[0] / "train-command.txt"
        if not saved.exists():
            raise BadInput(f"--reuse-runs: {saved} is missing")
        if saved.read_text().strip() != shlex.join(run_command(args, s)):
            raise BadInput(f"--reuse-runs: {saved} was trained with other flags")


def train_flags(args, scheme, save_dir):
    flags = (fl.translation_recipe(args.data_bin, args.arch, args.lr, args.warmup_updates,
                                   weight_decay=None)
             + ["--max-tokens", str(args.max_tokens), "--max-update", str(args.max_update),
                "--disable-validation", "--no-save", "--seed", str(args.seed),
                "--save-dir", str(save_dir)]
             + fl.log_flags(10) + fl.device_flags(args.gpu))
    if args.time_budget:
        flags += ["--stop-time-hours", repr(args.time_budget / 3600)]
    return flags + fl.scheme_flags(scheme, args.threshold) + shlex.split(args.extra)


def timed_steps(timing: Path) -> list:
    """A run's per-update records from experiments.timed_train's timing.jsonl."""
    return [r for r in map(json.loads, timing.read_text().splitlines()) if "step_s" in r]


def summarize(timing: Path, log: Path, skip: int, stop: Optional[int] = None) -> dict:
    """The updates skip+1..stop (default: to the end) of one run."""
    stop = float("inf") if stop is None else stop
    window = [r for r in timed_steps(timing) if skip < r["update"] <= stop]
    if not window:
        raise RuntimeError(f"{timing}: no update after the first {skip}")
    step_s = sum(r["step_s"] for r in window)
    moe_fwd = sum(r.get("moe_fwd_ms", 0.0) for r in window)
    moe_bwd = sum(r.get("moe_bwd_ms", 0.0) for r in window)
    ffn = sum(r.get("moe_fwd_ms", 0.0) + r.get("moe_bwd_ms", 0.0) + r.get("dense_ffn_fwd_ms", 0.0)
              + r.get("dense_ffn_bwd_ms", 0.0) for r in window)
    inner = [r for r in compare.records(log, "train_inner")
             if skip < int(r.get("num_updates", 0)) <= stop]
    two = [float(r["moe_2x"]) for r in inner if "moe_2x" in r]
    return {
        "updates": len(window),
        "words": sum(r["words"] for r in window),
        "words_per_s": sum(r["words"] for r in window) / step_s,
        "step_ms": 1e3 * step_s / len(window),
        "step_ms_median": 1e3 * statistics.median(r["step_s"] for r in window),
        "moe_fwd_ms": moe_fwd / len(window),
        "moe_bwd_ms": moe_bwd / len(window),
        "moe_share": (moe_fwd + moe_bwd) / (1e3 * step_s),
        # the FFN sublayers' forward + backward, MoE or dense (fc1 ... fc2): the column that sets
        # a dense run's FFNs beside an MoE run's layers at equal FLOPs (top-1)
        "ffn_ms": ffn / len(window),
        "moe_2x": statistics.mean(two) if two else None,
        "moe_2x_first_last": [two[0], two[-1]] if two else None,
    }


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def pct(v, spec):
    """A share as a percentage; "-" where fairseq logged none (a run shorter than --log-interval)."""
    return "-" if v is None else format(100 * v, spec) + "%"


def render(args, results, schemes, argv, stop: int) -> str:
    ref = results[schemes[0]]["words_per_s"]
    budget = ""
    if args.time_budget:
        budget = (f" Each scheme trained for {args.time_budget:g} s of training time; updates "
                  "reached: " + ", ".join(f"{s} {results[s]['updates_reached']}" for s in schemes)
                  + ".")
    lines = [
        f"# Training throughput: {', '.join(schemes)}", "",
        f"`python -m experiments.throughput {shlex.join(argv)}`", "",
        f"Machine: {results['_machine']}. Arch `{args.arch}`, --max-tokens {args.max_tokens}, "
        f"{'GPU --fp16' if args.gpu else 'CPU fp32'}; figures over updates {args.skip + 1}-"
        f"{stop} of each run.{budget}", "",
        f"| scheme | words/s | vs {schemes[0]} | step ms | MoE fwd ms | MoE bwd ms | MoE share "
        "of step | two-expert tokens | FFN sublayers ms (MoE or dense) | FFN time vs dense | "
        "step vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = results.get("dense")
    for s in schemes:
        r = results[s]
        vs_dense = ["-", "-"]
        if dense is not None and dense.get("ffn_ms") and r.get("ffn_ms") is not None:
            vs_dense = [f"{r['ffn_ms'] / dense['ffn_ms']:.2f}x",
                        f"{r['step_ms'] / dense['step_ms']:.2f}x"]
        lines.append(
            f"| {s}{f', T = {args.threshold:g}' if s == 'adaptive' else ''} | {r['words_per_s']:.0f} "
            f"| {r['words_per_s'] / ref:.2f}x | {r['step_ms']:.1f} | {r['moe_fwd_ms']:.1f} "
            f"| {r['moe_bwd_ms']:.1f} | {100 * r['moe_share']:.0f}% "
            f"| {pct(r['moe_2x'], '.1f')} | {fmt(r.get('ffn_ms'), '.1f')} | {vs_dense[0]} "
            f"| {vs_dense[1]} |")
    if dense is not None:
        lines += ["", "FFN time vs dense: the MoE layers' forward + backward over the dense "
                  "model's FFN sublayers (fc1, activation, fc2), per update. At top-1 the FLOPs "
                  "are equal (plus the gate's), so the ratio is what routing costs on top of "
                  "them."]
    if results.get("_windows"):
        first, rest = schemes[0], schemes[1:]
        head = (["updates"] + [f"{s} words/s" for s in schemes] + [f"{s} vs {first}" for s in rest]
                + [f"{s} MoE time vs {first}" for s in rest] + [f"{s} two-expert" for s in schemes])
        lines += ["", f"Over training, in windows of {args.windows} updates:", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for w in results["_windows"]:
            runs = w["runs"]
            moe = {s: runs[s]["moe_fwd_ms"] + runs[s]["moe_bwd_ms"] for s in schemes}
            cells = ([f"{w['first']}-{w['last']}"] + [f"{runs[s]['words_per_s']:.0f}" for s in schemes]
                     + [f"{runs[s]['words_per_s'] / runs[first]['words_per_s']:.2f}x" for s in rest]
                     + [f"{moe[s] / moe[first]:.2f}" for s in rest]
                     + [pct(runs[s]["moe_2x"], ".0f") for s in schemes])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def last_update(timing: Path) -> int:
    """The last update a run timed (--max-update, or fewer where --time-budget stopped it)."""
    return max((r["update"] for r in timed_steps(timing)), default=0)


def windows(args, schemes, stop: int) -> list:
    """Every scheme summarized over consecutive windows of ``--windows`` updates, to ``stop``."""
    out = []
    for lo in range(0, stop, args.windows):
        hi = min(lo + args.windows, stop)
        runs = {s: summarize(*run_files(args, s)[1:], lo, hi) for s in schemes}
        out.append(dict(first=lo + 1, last=hi, runs=runs))
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        schemes = check(args)
    except BadInput as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    env = compare.env_for(args)
    results = {}
    reached = {}
    for s in schemes:
        run, timing, log = run_files(args, s)
        t0 = time.time()
        if not args.reuse_runs:
            cmd = run_command(args, s)
            run.mkdir(parents=True, exist_ok=True)
            (run / "train-command.txt").write_text(shlex.join(cmd) + "\n")
            with open(log, "w") as fh:
                proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
            if proc.returncode != 0:
                tail = (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
                print(f"{PROG}: error: {s} training failed ({proc.returncode}), see {log}: {tail}",
                      file=sys.stderr)
                return 1
        reached[s] = last_update(timing)
        print(f"{s}: {reached[s]} updates ({time.time() - t0:.0f} s)", flush=True)
    stop = min(reached.values())  # the updates every scheme reached: all of them, unless timed
    if stop <= args.skip:
        print(f"{PROG}: error: the runs reached {stop} updates, not past --skip {args.skip} "
              f"(raise --time-budget or lower --skip)", file=sys.stderr)
        return 1
    for s in schemes:
        results[s] = r = dict(summarize(*run_files(args, s)[1:], args.skip, stop),
                              updates_reached=reached[s])
        print(f"{s}: {r['words_per_s']:.0f} words/s, step {r['step_ms']:.1f} ms, MoE "
              f"{100 * r['moe_share']:.0f}% of the step, two-expert {fmt(r['moe_2x'], '.3f')}",
              flush=True)
    if args.reuse_runs:  # the machine the runs were made on
        results["_machine"] = json.loads((args.out / "throughput.json").read_text())["machine"]
    else:
        results["_machine"] = compare.machine(args.gpu) + ("" if args.gpu else
                                                           f"; {args.threads} threads per run")
    if args.windows:
        results["_windows"] = windows(args, schemes, stop)
    table = render(args, results, schemes, argv, stop)
    (args.out / "throughput.md").write_text(table)
    (args.out / "throughput.json").write_text(json.dumps(
        dict(command=argv, machine=results.pop("_machine"), windows=results.pop("_windows", None),
             schemes=schemes, runs=results,
             ratio_to_first={s: results[s]["words_per_s"] / results[schemes[0]]["words_per_s"]
                             for s in schemes}), indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
