#!/usr/bin/env python
"""All-to-all traffic of expert-parallel training, adaptive gating against top-2, side by side.

Trains the same model twice under ``torchrun --nproc_per_node N fairseq-train --cpu`` with
``--moe-expert-parallel-size N`` (one run per gating, identical otherwise) and reads fairseq's
``moe_a2a_mb`` (MB of token rows all ranks sent to other ranks' experts per update, forward) and
``moe_ept`` (expert slots per token) from the json logs. Writes ``a2a_bytes.md`` and prints it.

    python -m experiments.a2a_bytes --data-bin demo-out/data-bin --out ep-out
"""

import argparse
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from . import child_env
from . import flags as fl

PROG = "a2a_bytes.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-bin", type=Path, required=True, help="fairseq-preprocess output")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--nproc", type=int, default=2, help="ranks = expert-parallel size (2)")
    p.add_argument("--arch", default="adaptive_moe_transformer_tiny")
    p.add_argument("--max-update", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=2048, help="per rank (2048)")
    p.add_argument("--threshold", default="0.1", help="adaptive threshold T (0.1)")
    p.add_argument("--extra", default="", help="more fairseq-train flags, the same for both runs")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args, gating: str) -> list:
    """One run's ``train_inner`` json records; RuntimeError naming its log if it fails."""
    save = args.out / f"checkpoints-{gating}"
    shutil.rmtree(save, ignore_errors=True)
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "torchrun"), "--nproc_per_node", str(args.nproc), "--master_port",
           str(free_port()), str(bin_dir / "fairseq-train"),
           *fl.translation_recipe(args.data_bin, args.arch, "2e-3", 100, dropout=None,
                                  weight_decay=None),
           "--moe-gating", gating, "--moe-threshold", args.threshold,
           "--moe-expert-parallel-size", str(args.nproc), "--ddp-backend", "legacy_ddp",
           "--max-tokens", str(args.max_tokens), "--max-update", str(args.max_update),
           *fl.device_flags(gpu=False), "--seed", "1", "--save-dir", str(save), "--no-save",
           "--disable-validation", *fl.log_flags(10), *args.extra.split()]
    log = args.out / f"train-{gating}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                            env=child_env(OMP_NUM_THREADS="1")).returncode
    if rc != 0:
        raise RuntimeError(f"{gating} run failed (exit {rc}); see {log}")
    return [json.loads(line.split("| train_inner | ", 1)[1])
            for line in log.read_text().splitlines() if "| train_inner | " in line]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.data_bin / "dict.de.txt").exists() and not list(args.data_bin.glob("dict.*.txt")):
        print(f"{PROG}: {args.data_bin} is not a fairseq data-bin (no dict.*.txt)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for gating in ("top2", "adaptive"):
        try:
            logs = train(args, gating)
        except RuntimeError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 1
        mb = [float(r["moe_a2a_mb"]) for r in logs]
        ept = [float(r["moe_ept"]) for r in logs]
        wpb = [float(r["wpb"]) for r in logs]
        rows[gating] = (sum(mb) / len(mb), mb[0], mb[-1], sum(ept) / len(ept), sum(wpb) / len(wpb))
    top2 = rows["top2"][0]
    lines = [f"{args.nproc} ranks, --moe-expert-parallel-size {args.nproc}, {args.arch}, "
             f"{args.max_update} updates, --max-tokens {args.max_tokens} per rank, data {args.data_bin}",
             "", "| gating | MB sent per update (mean) | first 10 updates | last 10 updates | "
             "expert slots per token | target words per update | MB vs top2 |",
             "|---|---|---|---|---|---|---|"]
    for gating, (mean, first, last, ept, wpb) in rows.items():
        lines.append(f"| {gating} | {mean:.3f} | {first:.3f} | {last:.3f} | {ept:.3f} | {wpb:.0f} | "
                     f"{mean / top2:.2f}x |")
    text = "\n".join(lines) + "\n"
    (args.out / "a2a_bytes.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
