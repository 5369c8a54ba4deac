#!/usr/bin/env python
"""Generation speed: an MoE model under top-1 and adaptive inference against a dense model of
the same dimensions, through fairseq-generate and fairseq-interactive.

Builds two checkpoints of the same shape (default 3+3 layers, d 256, FFN 1024, 8 experts; one
update of training: timing needs no trained model, since every hypothesis is forced to the same
length): the MoE (``adaptive_moe_transformer_tiny`` resized) and the dense baseline (the same
with ``--moe-freq 0``: fairseq's own FFN layers). Then, one after the other, with ``--threads``
threads:

- ``fairseq-generate`` on the data-bin's test set, beam ``--beam``, every hypothesis forced to
  ``--length`` tokens (``--min-len L --max-len-a 0 --max-len-b L``), with each batching of
  ``--batchings`` (``max-tokens:4000``, ``batch-size:1``); the time is fairseq's own
  "Translated ... in X s" (model loading excluded);
- ``fairseq-interactive`` over the first ``--interactive-sentences`` test sentences piped in as
  raw text, one request at a time (``--buffer-size 1 --batch-size 1``, as a server answers
  requests); the time per sentence is the command's wall clock minus the same command's on one
  sentence (start-up and loading), over the remaining sentences.

Every MoE figure is also given against the dense one: for top-1 inference the FLOPs are the
dense model's (plus the gate's), so the ratio is what routing costs. Writes ``OUT/generation.md``
and ``OUT/generation.json``.

    python examples/translation/prepare.py --data MULTI30K_DIR --out data-bin/gen \\
        --max-train-lines 2000 --max-eval-lines 300 --vocab-size 4000
    python -m experiments.generation --data-bin data-bin/gen --out gen-out
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import child_env
from . import compare
from . import flags as fl

PROG = "generation.py"
BIN = Path(sys.executable).parent
TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s")


class BadInput(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--data-bin", type=Path, required=True,
                   help="a de-en data-bin from examples/translation/prepare.py (with spm.model "
                        "and raw/test.de); its test set is what fairseq-generate translates")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--interactive-sentences", type=int, default=50,
                   help="test sentences piped through fairseq-interactive (50; 0 = skip it)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--length", type=int, default=30, help="forced hypothesis length (30)")
    p.add_argument("--batchings", default="max-tokens:4000,batch-size:1",
                   help="fairseq-generate batchings, comma-separated FLAG:VALUE with FLAG "
                        "max-tokens or batch-size")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--layers", type=int, default=3, help="encoder and decoder layers (3)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    p.add_argument("--gatings", default="top1,train",
                   help="MoE inference gatings, --moe-eval-gating values (top1,train)")
    args = p.parse_args(argv)
    for needed in ("dict.en.txt", "spm.model", "raw/test.de"):
        if not (args.data_bin / needed).is_file():
            raise BadInput(f"--data-bin {args.data_bin}: no {needed} (make it with "
                           "examples/translation/prepare.py)")
    try:
        batchings = [tuple(b.split(":")) for b in args.batchings.split(",") if b]
        if not batchings or any(f not in ("max-tokens", "batch-size") or int(v) < 1
                                for f, v in batchings):
            raise ValueError
    except ValueError:
        raise BadInput(f"--batchings: FLAG:VALUE with FLAG max-tokens or batch-size and VALUE "
                       f">= 1, got {args.batchings!r}") from None
    args.batchings = batchings
    args.gatings = [g for g in args.gatings.split(",") if g]
    if args.interactive_sentences == 1 or args.interactive_sentences < 0:
        raise BadInput("--interactive-sentences: 0 or at least 2")
    return args


def run(args, cmd, log: Path, stdin=None) -> float:
    """Run ``cmd`` with its output in ``log``; its wall time. RuntimeError if it fails."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, text=True,
                              input=stdin, env=child_env(threads=args.threads))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed ({proc.returncode}), see {log}")
    return wall


def build(args, name: str, extra: list) -> Path:
    """A checkpoint of the shape after one update."""
    save = args.out / name
    shutil.rmtree(save, ignore_errors=True)
    shape = ["--encoder-layers", args.layers, "--decoder-layers", args.layers,
             "--encoder-embed-dim", args.dim, "--decoder-embed-dim", args.dim,
             "--encoder-ffn-embed-dim", args.ffn, "--decoder-ffn-embed-dim", args.ffn,
             "--encoder-attention-heads", 4, "--decoder-attention-heads", 4,
             "--moe-expert-count", args.experts]
    run(args, [BIN / "fairseq-train",
               *fl.translation_recipe(args.data_bin, "adaptive_moe_transformer_tiny", "1e-3", 1,
                                      weight_decay=None),
               *shape, "--max-tokens", 2000, "--max-update", 1, "--disable-validation", "--cpu",
               "--save-dir", save, "--no-epoch-checkpoints", *extra],
        args.out / f"train-{name}.log")
    return save / "checkpoint_last.pt"


def forced(args) -> list:
    return ["--beam", args.beam, "--min-len", args.length, "--max-len-a", 0,
            "--max-len-b", args.length]


def generate(args, ckpt: Path, batching, gating: str, log: Path) -> dict:
    flag, value = batching
    run(args, [BIN / "fairseq-generate", args.data_bin, "--user-dir", fl.USER_DIR, "--path", ckpt,
               "--gen-subset", "test", "--cpu", *forced(args), f"--{flag}", value,
               "--required-batch-size-multiple", 1,
               "--model-overrides", f"{{'moe_eval_gating': '{gating}'}}"], log)
    match = TRANSLATED.search(log.read_text())
    if match is None:
        raise RuntimeError(f"no 'Translated ... in Xs' line in {log}")
    return {"sentences": int(match.group(1).replace(",", "")), "s": float(match.group(3))}


def interactive(args, ckpt: Path, gating: str, log: Path, lines) -> dict:
    cmd = [BIN / "fairseq-interactive", args.data_bin, "--user-dir", fl.USER_DIR, "--path", ckpt,
           "--cpu", *forced(args), "--buffer-size", 1, "--batch-size", 1,
           "--bpe", "sentencepiece", "--sentencepiece-model", args.data_bin / "spm.model",
           "--source-lang", "de", "--target-lang", "en",
           "--model-overrides", f"{{'moe_eval_gating': '{gating}'}}"]
    one = run(args, cmd, log.with_suffix(".one.log"), stdin=lines[0] + "\n")
    many = run(args, cmd, log, stdin="\n".join(lines) + "\n")
    if log.read_text().count("\nH-") < len(lines):
        raise RuntimeError(f"fairseq-interactive answered fewer than {len(lines)} sentences, "
                           f"see {log}")
    return {"sentences": len(lines), "s": many - one, "ms_per_sentence":
            1e3 * (many - one) / (len(lines) - 1)}


def measure(args, argv) -> int:
    ckpts = {"dense": build(args, "dense", ["--moe-freq", "0"]), "moe": build(args, "moe", [])}
    rows = [("dense", "dense", ckpts["dense"], "top1")] + \
        [(f"moe, {g} inference", "moe", ckpts["moe"], g) for g in args.gatings]
    lines = (args.data_bin / "raw" / "test.de").read_text().splitlines()
    lines = lines[:args.interactive_sentences]
    results = []
    for label, model, ckpt, gating in rows:
        r = {"label": label, "model": model, "gating": gating}
        for flag, value in args.batchings:
            key = f"{flag}:{value}"
            r[key] = generate(args, ckpt, (flag, value), gating,
                              args.out / f"gen-{model}-{gating}-{flag}{value}.log")
            print(f"{label}, --{flag} {value}: {r[key]['s']:.1f} s", flush=True)
        if len(lines) >= 2:
            r["interactive"] = interactive(args, ckpt, gating,
                                           args.out / f"interactive-{model}-{gating}.log", lines)
            print(f"{label}, fairseq-interactive: {r['interactive']['ms_per_sentence']:.0f} ms "
                  "per sentence", flush=True)
        results.append(r)
    report = render(args, argv, results)
    (args.out / "generation.md").write_text(report)
    (args.out / "generation.json").write_text(json.dumps(
        {"argv": argv, "machine": compare.machine(False) + f"; {args.threads} threads",
         "results": results}, indent=1))
    print(report)
    return 0


def render(args, argv, results) -> str:
    dense = results[0]
    cols = [f"{f}:{v}" for f, v in args.batchings] + (["interactive"] if "interactive" in dense
                                                       else [])
    names = [f"fairseq-generate --{c.replace(':', ' ')}" for c in cols if c != "interactive"]
    names += ["fairseq-interactive, ms per sentence"] if "interactive" in cols else []
    lines = [f"# Generation speed: MoE against dense ({args.layers}+{args.layers} layers, d "
             f"{args.dim}, FFN {args.ffn}, {args.experts} experts)", "",
             f"`python -m experiments.generation {' '.join(argv)}`", "",
             f"Machine: {compare.machine(False)}; {args.threads} threads. Beam {args.beam}, every "
             f"hypothesis forced to {args.length} tokens; {dense[cols[0]]['sentences']} test "
             "sentences for fairseq-generate (its own timing, loading excluded).", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in results:
        cells = []
        for c in cols:
            value = r[c]["ms_per_sentence"] if c == "interactive" else r[c]["s"]
            base = dense[c]["ms_per_sentence"] if c == "interactive" else dense[c]["s"]
            unit = " ms" if c == "interactive" else " s"
            cells.append(f"{value:.1f}{unit}" + ("" if r is dense else f" ({value / base:.2f}x)"))
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except BadInput as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        return measure(args, argv)
    except RuntimeError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
