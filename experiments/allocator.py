"""The CPU allocator settings measured: the same short fairseq-train run under glibc's defaults,
under the plugin's ``mallopt`` settings (``fairseq_adaptive_moe.cpu_allocator``, the default) and
under environment variables, side by side.

    python -m experiments.allocator --data-bin DATA_BIN [--max-update 80] [--num-workers 0]

Each run is ``fairseq-train`` of ``adaptive_moe_transformer_tiny`` (the demo's flags) under
``/usr/bin/time -v``, one after another with the same thread count; the table gives wall, user and
system time, minor page faults, peak RSS and the last logged training loss (which must not
change: the settings change where memory comes from, not what is computed).
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from . import child_env
from . import flags as fl

ENV_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296",
                "MALLOC_TOP_PAD_": "1073741824"}
SETTINGS = {
    "glibc defaults": {"ADAPTIVE_MOE_MALLOC": "0"},
    "plugin (mallopt, default)": {},
    "environment (MALLOC_*_)": ENV_SETTINGS,
}
TIME_FIELDS = {"real": r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)",
               "user": r"User time \(seconds\): (\S+)", "sys": r"System time \(seconds\): (\S+)",
               "faults": r"Minor \(reclaiming a frame\) page faults: (\d+)",
               "rss_mb": r"Maximum resident set size \(kbytes\): (\d+)"}


def seconds(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def run(args, name, extra_env, out: Path) -> dict:
    save = out / re.sub(r"\W+", "-", name).strip("-")
    flags = (fl.translation_recipe(args.data_bin, "adaptive_moe_transformer_tiny", 2e-3, 400)
             + ["--max-tokens", "4096", "--max-update", str(args.max_update), "--cpu", "--seed", "1",
                "--save-dir", str(save), "--no-save", "--disable-validation",
                "--num-workers", str(args.num_workers)] + fl.log_flags(10))
    env = child_env(args.threads)
    for key in list(ENV_SETTINGS) + ["ADAPTIVE_MOE_MALLOC"]:
        env.pop(key, None)
    env.update(extra_env)
    train = str(Path(sys.executable).parent / "fairseq-train")
    proc = subprocess.run(["/usr/bin/time", "-v", train, *flags], env=env, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: fairseq-train failed: {proc.stderr.strip().splitlines()[-1:]}")
    row = {"name": name}
    for key, pattern in TIME_FIELDS.items():
        value = re.search(pattern, proc.stderr).group(1)
        row[key] = seconds(value) if key == "real" else float(value)
    row["rss_mb"] /= 1024
    losses = [json.loads(line.split("| train_inner | ", 1)[1])["loss"]
              for line in proc.stdout.splitlines() if "| train_inner | " in line]
    row["last_loss"] = losses[-1] if losses else None
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-bin", type=Path, required=True, help="a translation data-bin")
    p.add_argument("--out", type=Path, default=Path("allocator-out"), help="scratch folder")
    p.add_argument("--max-update", type=int, default=80)
    p.add_argument("--num-workers", type=int, default=0, help="fairseq's --num-workers")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not Path("/usr/bin/time").is_file():
        print("allocator.py: needs /usr/bin/time (GNU time)", file=sys.stderr)
        return 2
    if not any(args.data_bin.glob("dict.*.txt")):
        print(f"allocator.py: no data-bin at {args.data_bin}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run(args, name, env, args.out) for name, env in SETTINGS.items()]
    base = rows[0]["real"]
    print(f"fairseq-train, adaptive_moe_transformer_tiny, {args.max_update} updates, "
          f"--max-tokens 4096, {args.threads} threads, --num-workers {args.num_workers}\n")
    print("| allocator | wall (s) | vs defaults | user (s) | sys (s) | minor faults | peak RSS (MB) "
          "| last loss |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['real']:.1f} | {r['real'] / base:.2f}x | {r['user']:.1f} | "
              f"{r['sys']:.1f} | {r['faults'] / 1e6:.2f} M | {r['rss_mb']:.0f} | {r['last_loss']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
