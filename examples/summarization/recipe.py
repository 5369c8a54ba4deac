#!/usr/bin/env python
"""The BART CNN/DailyMail recipe with MoE gating: train one scheme, then generate and score ROUGE.

    python examples/summarization/recipe.py train DATA_BIN SAVE_DIR --scheme adaptive [...]
    python examples/summarization/recipe.py evaluate DATA_BIN CHECKPOINT OUT_DIR [...]

``train`` runs ``fairseq-train`` with fairseq's BART summarization fine-tuning flags
(``examples/bart/README.summarization.md``: label smoothing 0.1, ``--truncate-source``,
``--layernorm-embedding``, shared embeddings, dropout 0.1, attention dropout 0.1, weight decay
0.01, Adam (0.9, 0.999) eps 1e-8, clip-norm 0.1, polynomial decay, ``--required-batch-size-multiple
1``), the criterion ``adaptive_moe_label_smoothed_cross_entropy`` and the scheme:

- ``dense``: ``--moe-freq 0`` (no MoE layer, same model code);
- ``top1`` / ``top2``: ``--moe-gating top1`` / ``top2``;
- ``adaptive``: ``--moe-gating adaptive --moe-threshold T``.

Everything else is identical between schemes. ``--restore-file`` takes a dense BART checkpoint
(``bart.base/model.pt``, ``bart.large/model.pt``, or your own); its FFNs become the experts
when it loads, and the optimizer, data loader and meters are reset as fairseq's recipe does.
Flags after ``--`` go to fairseq-train unchanged (``--fp16``, ``--update-freq 4``, ...).

``evaluate`` generates the ``--gen-subset`` summaries with BART's CNN/DM settings (beam 4,
length penalty 2.0, ``--max-len-b 140``, ``--min-len 55``, ``--no-repeat-ngram-size 3``) under
each gating of ``--gatings``, default ``top1,train``: ``top1`` (``--model-overrides
"{'moe_eval_gating': 'top1'}"``, the paper's evaluation, first) and ``train`` (as trained,
``--model-overrides "{'moe_eval_gating': 'train'}"``), each passed explicitly whatever the
checkpoint saved as its ``--moe-eval-gating``, and scores ROUGE-1/2/L with
``score.py``. The BPE is read from ``DATA_BIN/prepare.json`` (sentencepiece, or BART's GPT-2 BPE
with its files). Writes ``gen-<gating>.txt``, ``rouge-<gating>.json`` and ``rouge.md``.

Both print the fairseq commands they run. Bad input (a missing data-bin, checkpoint or
reference, a bad scheme) gets one line on stderr and exit status 2.

The flags are built by ``experiments/flags.py`` of this clone (``bart_summarization_flags``,
``bart_generate_flags``), which ``python -m experiments.compare`` uses too on a summarization
data-bin; each command is printed before it runs.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:  # the clone's root, for experiments.flags
    sys.path.insert(0, str(ROOT))

from experiments import flags  # noqa: E402  (after the clone's root is on sys.path)

BIN = Path(sys.executable).parent
SCHEMES = flags.SCHEMES
GATINGS = flags.BART_GATINGS
GENERATION = flags.BART_GENERATION  # fairseq examples/bart/README.summarization.md, CNN/DM


class BadInput(Exception):
    pass


def check_data_bin(data_bin: Path, subset: str = "test") -> dict:
    """The data-bin's prepare.json record; BadInput if it is not a summarization data-bin."""
    if not (data_bin / "dict.source.txt").is_file():
        raise BadInput(f"no summarization data-bin at {data_bin} (no dict.source.txt; run "
                       "examples/summarization/prepare.py first)")
    ref = data_bin / "raw" / f"{subset}.target"
    if not ref.is_file():
        raise BadInput(f"{ref} is missing (the raw references that prepare.py keeps)")
    try:
        return json.loads((data_bin / "prepare.json").read_text())
    except (OSError, ValueError):
        return {}


def train_flags(data_bin, save_dir, scheme, *args, **kwargs):
    """fairseq-train's arguments for one scheme (the program name excluded); the parameters of
    ``experiments.flags.bart_summarization_flags``."""
    try:
        return flags.bart_summarization_flags(data_bin, save_dir, scheme, *args, **kwargs)
    except ValueError as e:
        raise BadInput(str(e)) from None


def generate_args(data_bin, checkpoint, gating="train", *args, **kwargs):
    """fairseq-generate's arguments with BART's CNN/DM settings (``overrides`` change them); the
    parameters of ``experiments.flags.bart_generate_flags``."""
    try:
        return flags.bart_generate_flags(data_bin, checkpoint, gating, *args, **kwargs)
    except ValueError as e:
        raise BadInput(str(e)) from None


def score(generate_output, reference):
    """score.py's JSON record for one generate output."""
    proc = subprocess.run([sys.executable, str(HERE / "score.py"), str(generate_output),
                           str(reference), "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"score.py failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def run(tool, argv, log=None):
    print(f"+ {shlex.join([tool] + argv)}", flush=True)
    out = open(log, "w") if log else None
    try:
        proc = subprocess.run([str(BIN / tool)] + argv, stdout=out, stderr=subprocess.STDOUT
                              if out else None, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    finally:
        if out:
            out.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed ({proc.returncode})" + (f", see {log}" if log else ""))


def cmd_train(a) -> None:
    check_data_bin(a.data_bin)
    if a.restore_file is not None and not a.restore_file.is_file():
        raise BadInput(f"--restore-file not found: {a.restore_file}")
    run("fairseq-train", train_flags(
        a.data_bin, a.save_dir, a.scheme, a.threshold, a.arch, a.max_update, a.max_tokens, a.lr,
        a.warmup_updates, a.max_source_positions, a.seed, a.restore_file, a.cpu, extra=a.extra))


def cmd_evaluate(a) -> None:
    record = check_data_bin(a.data_bin, a.gen_subset)
    if not a.checkpoint.is_file():
        raise BadInput(f"checkpoint not found: {a.checkpoint}")
    gatings = [g.strip() for g in a.gatings.split(",") if g.strip()]
    bad = [g for g in gatings if g not in GATINGS]
    if bad or not gatings:
        raise BadInput(f"bad --gatings {a.gatings!r} (comma-separated from {', '.join(GATINGS)})")
    overrides = {k: getattr(a, k) for k in GENERATION}
    a.out.mkdir(parents=True, exist_ok=True)
    reference = a.data_bin / "raw" / f"{a.gen_subset}.target"
    rows = []
    for gating in gatings:
        gen = a.out / f"gen-{gating}.txt"
        run("fairseq-generate", generate_args(a.data_bin, a.checkpoint, gating, a.gen_subset,
                                              record, a.cpu, **overrides), log=gen)
        result = score(gen, reference)
        (a.out / f"rouge-{gating}.json").write_text(json.dumps(result, indent=1) + "\n")
        rows.append(f"| {gating} | {result['rouge1']:.2f} | {result['rouge2']:.2f} | "
                    f"{result['rougeL']:.2f} | {result['rougeLsum']:.2f} | {result['articles']} |")
        print(f"{gating}: ROUGE-1 {result['rouge1']:.2f}  ROUGE-2 {result['rouge2']:.2f}  "
              f"ROUGE-L {result['rougeL']:.2f}  ROUGE-Lsum {result['rougeLsum']:.2f}", flush=True)
    settings = ", ".join(f"{k} {v}" for k, v in overrides.items())
    (a.out / "rouge.md").write_text(
        f"ROUGE of `{a.checkpoint}` on `{reference}` ({settings}; F1 x 100, rouge-score, "
        "Porter stemmer)\n\n| gating at test | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | "
        "articles |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def parse_args(argv):
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="train: flags after -- go to fairseq-train unchanged")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fairseq-train one scheme with the BART recipe flags")
    t.add_argument("data_bin", type=Path)
    t.add_argument("save_dir", type=Path)
    t.add_argument("--scheme", choices=SCHEMES, default="adaptive")
    t.add_argument("--threshold", type=float, default=0.1, help="adaptive threshold T (0.1)")
    t.add_argument("--arch", default="adaptive_moe_bart_tiny",
                   help="adaptive_moe_bart_{tiny,base,large} (default: tiny)")
    t.add_argument("--restore-file", type=Path, default=None,
                   help="a dense BART checkpoint to start from (e.g. bart.large/model.pt)")
    t.add_argument("--max-update", type=int, default=400)
    t.add_argument("--max-tokens", type=int, default=4096)
    t.add_argument("--lr", type=float, default=3e-5, help="3e-5 as BART's recipe; from scratch "
                   "a tiny model wants about 1e-3")
    t.add_argument("--warmup-updates", type=int, default=None,
                   help="default: min(500, max-update / 10)")
    t.add_argument("--max-source-positions", type=int, default=None,
                   help="--truncate-source cuts articles there (default: the arch's, 1024)")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--cpu", action="store_true")
    e = sub.add_parser("evaluate", help="generate with BART's CNN/DM settings and score ROUGE")
    e.add_argument("data_bin", type=Path)
    e.add_argument("checkpoint", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("--gatings", default="top1,train",
                   help="comma-separated, in the order of the table: top1 (the paper's "
                        "evaluation), train (as trained), top2, adaptive")
    e.add_argument("--gen-subset", default="test")
    e.add_argument("--cpu", action="store_true")
    for key, value in GENERATION.items():
        e.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value,
                       help=f"fairseq-generate --{key.replace('_', '-')} ({value})")
    a = p.parse_args(argv)
    a.extra = extra
    return a


def main(argv=None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        {"train": cmd_train, "evaluate": cmd_evaluate}[a.command](a)
    except BadInput as e:
        print(f"recipe.py: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"recipe.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
