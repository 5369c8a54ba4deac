#!/usr/bin/env python
"""CNN/DailyMail-style raw text -> fairseq binarized data for BART-style summarization.

Input: a directory (``--data``, default ``<repo>/../shared/data/cnndm-small``) with
``{train,valid,test}.{source,target}``: one article / one summary per line, line-aligned.

Two ways to split words (``--bpe``):

- ``sentencepiece`` (default): one BPE model trained here on the training split (articles and
  summaries), with the steps ``examples/translation/prepare.py`` uses
  (``fairseq_adaptive_moe.data.prepare``); fairseq-preprocess then builds one
  joined dictionary. Generate with ``--post-process sentencepiece``.
- ``gpt2``: BART's own byte-level BPE, with the files of a pretrained BART (``--gpt2-encoder-json
  encoder.json --gpt2-vocab-bpe vocab.bpe --gpt2-dict dict.txt``), encoded with fairseq's own
  ``examples/roberta/multiprocessing_bpe_encoder`` logic and binarized with that fixed
  ``dict.txt`` (``--srcdict``/``--tgtdict``), so a ``bart.base``/``bart.large`` checkpoint fits
  the data. Generate with ``--bpe gpt2 --gpt2-encoder-json ... --gpt2-vocab-bpe ...``. Nothing is
  downloaded: a missing file stops with one line naming it.

Long articles: ``--max-source-tokens N`` keeps the first N BPE tokens of every article (BART
keeps 1024, and ``fairseq-train --truncate-source`` truncates again at ``--max-source-positions``);
``--max-target-tokens N`` does the same for the binarized summaries. The raw references used for
ROUGE (``raw/{valid,test}.target``) are never truncated.

Output (``--out``): ``bpe/{split}.{source,target}`` (the encoded text), ``raw/{valid,test}.*``,
``spm.model`` (sentencepiece only), ``dict.{source,target}.txt`` and the binarized splits, and
``prepare.json`` (settings, counts, versions), written last: it marks a complete output, which a
rerun reuses unless ``--force``. Bad input: one line on stderr, exit 2, nothing written.

    python examples/summarization/prepare.py --out data-bin/cnndm --max-source-tokens 400
"""

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

from fairseq_adaptive_moe.data import prepare as tp  # the steps shared with translation's prepare.py

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1].parent / "shared" / "data" / "cnndm-small"
SRC, TGT = "source", "target"
PROG = "prepare.py"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


InputError = tp.InputError
SPLITS = tp.SPLITS


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="directory with {train,valid,test}.{source,target}")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--bpe", choices=("sentencepiece", "gpt2"), default="sentencepiece",
                   help="sentencepiece: train one here; gpt2: BART's BPE from the --gpt2-* files")
    p.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece vocabulary size")
    p.add_argument("--gpt2-encoder-json", type=Path, help="BART's encoder.json (--bpe gpt2)")
    p.add_argument("--gpt2-vocab-bpe", type=Path, help="BART's vocab.bpe (--bpe gpt2)")
    p.add_argument("--gpt2-dict", type=Path,
                   help="BART's dict.txt, the fairseq dictionary of the pretrained model (--bpe gpt2)")
    p.add_argument("--max-source-tokens", type=int, default=None,
                   help="keep the first N BPE tokens of each article (default: all)")
    p.add_argument("--max-target-tokens", type=int, default=None,
                   help="keep the first N BPE tokens of each binarized summary (default: all; "
                        "the raw ROUGE references are never cut)")
    p.add_argument("--max-train-lines", type=int, default=None, help="first N training pairs")
    p.add_argument("--max-eval-lines", type=int, default=None, help="first N valid/test pairs")
    p.add_argument("--workers", type=int, default=2, help="processes for BPE and preprocessing")
    p.add_argument("--force", action="store_true", help="rebuild a complete output")
    args = p.parse_args(argv)
    for name in ("vocab_size", "max_source_tokens", "max_target_tokens", "max_train_lines",
                 "max_eval_lines", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def gpt2_files(args) -> Dict[str, Path]:
    """The three BART BPE files; InputError naming the first one missing."""
    files = {"--gpt2-encoder-json": args.gpt2_encoder_json, "--gpt2-vocab-bpe": args.gpt2_vocab_bpe,
             "--gpt2-dict": args.gpt2_dict}
    for flag, path in files.items():
        if path is None:
            raise InputError(f"--bpe gpt2 needs {flag} (BART's encoder.json, vocab.bpe and "
                             "dict.txt; nothing is downloaded)")
        if not path.is_file():
            raise InputError(f"{flag} file not found: {path}")
    return {flag: path.resolve() for flag, path in files.items()}


def gpt2_encode(corpus, files: Dict[str, Path], out_dir: Path, workers: int) -> None:
    """fairseq's multiprocessing GPT-2 BPE encoder over every split, empty lines kept aligned."""
    from multiprocessing import Pool

    from fairseq.examples.roberta.multiprocessing_bpe_encoder import MultiprocessingEncoder

    encoder = MultiprocessingEncoder(argparse.Namespace(
        encoder_json=str(files["--gpt2-encoder-json"]), vocab_bpe=str(files["--gpt2-vocab-bpe"]),
        keep_empty=True))
    with Pool(workers, initializer=encoder.initializer) as pool:
        for split, by_side in corpus.items():
            for side, lines in by_side.items():
                encoded = [enc[0] for _, enc in pool.imap(encoder.encode_lines,
                                                          ((line,) for line in lines), 50)]
                tp.write_lines(out_dir / f"{split}.{side}", encoded)


def truncate(path: Path, limit: Optional[int]) -> int:
    """Keep the first ``limit`` space-separated tokens of each line; returns the lines cut."""
    if limit is None:
        return 0
    lines = tp.read_lines(path, None)
    cut = [" ".join(line.split(" ")[:limit]) for line in lines]
    tp.write_lines(path, cut)
    return sum(a != b for a, b in zip(lines, cut))


def preprocess(bpe_dir: Path, dest: Path, workers: int, gpt2_dict: Optional[Path]) -> None:
    if gpt2_dict is None:
        tp.run_preprocess(bpe_dir, dest, SRC, TGT, workers)  # --joined-dictionary
        return
    cmd = tp.preprocess_command() + [
        "--source-lang", SRC, "--target-lang", TGT, "--srcdict", str(gpt2_dict),
        "--tgtdict", str(gpt2_dict), "--destdir", str(dest), "--workers", str(workers),
        *[a for s in SPLITS for a in (f"--{s}pref", str(bpe_dir / s))]]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-preprocess failed ({proc.returncode}): "
                           + "\n".join(proc.stdout.splitlines()[-20:]))


def settings(args, data: Path) -> dict:
    return {"data": str(data), "bpe": args.bpe, "vocab_size": args.vocab_size,
            "gpt2_files": None if args.bpe != "gpt2" else [str(p) for p in (
                args.gpt2_encoder_json, args.gpt2_vocab_bpe, args.gpt2_dict)],
            "max_source_tokens": args.max_source_tokens, "max_target_tokens": args.max_target_tokens,
            "max_train_lines": args.max_train_lines, "max_eval_lines": args.max_eval_lines}


def build(args, corpus, staging: Path, files) -> dict:
    """Every step into ``staging``; returns the record's details."""
    details: dict = {}
    bpe_dir = staging / "bpe"
    if args.bpe == "sentencepiece":
        text = staging / "spm-train.txt"
        # one sentence a line: sentencepiece skips training lines over 4192 bytes (most articles)
        tp.write_lines(text, [s for line in corpus["train"][SRC] + corpus["train"][TGT]
                              for s in SENTENCE_END.split(line) if s])
        print(f"{PROG}: [1/4] training sentencepiece BPE (vocab {args.vocab_size})", flush=True)
        details["spm_options"] = tp.train_spm(
            text, staging / "spm", args.vocab_size, args.workers,
            note=lambda msg: print(f"{PROG}: {msg}", file=sys.stderr))
        text.unlink()
        print(f"{PROG}: [2/4] encoding", flush=True)
        details["spm_vocab_size"] = tp.encode_splits(staging / "spm.model", corpus, bpe_dir,
                                                     args.workers)
    else:
        print(f"{PROG}: [1-2/4] GPT-2 BPE encoding ({files['--gpt2-encoder-json']})", flush=True)
        gpt2_encode(corpus, files, bpe_dir, args.workers)
    details["truncated_lines"] = {
        f"{split}.{side}": truncate(bpe_dir / f"{split}.{side}", limit)
        for split in SPLITS for side, limit in ((SRC, args.max_source_tokens),
                                                (TGT, args.max_target_tokens))}
    print(f"{PROG}: [3/4] raw valid/test text for ROUGE", flush=True)
    for split in ("valid", "test"):
        for side in (SRC, TGT):
            tp.write_lines(staging / "raw" / f"{split}.{side}", corpus[split][side])
    print(f"{PROG}: [4/4] fairseq-preprocess", flush=True)
    preprocess(bpe_dir, staging, args.workers, files.get("--gpt2-dict"))
    with open(staging / f"dict.{SRC}.txt", encoding="utf-8") as f:
        details["fairseq_dict_size"] = sum(1 for _ in f)
    return details


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    data, out = args.data.expanduser().resolve(), args.out.expanduser().resolve()
    try:
        paths = tp.check_inputs(data, SRC, TGT)
        files = gpt2_files(args) if args.bpe == "gpt2" else {}
        if out.exists() and not out.is_dir():
            raise InputError(f"--out exists and is not a directory: {out}")
        record = None if args.force else tp.read_record(out)
        if record is None:
            corpus = tp.load_corpus(paths, SRC, TGT, args.max_train_lines, args.max_eval_lines)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if record is not None:
        changed = [k for k, v in settings(args, data).items() if record.get("args", {}).get(k) != v]
        print(f"{PROG}: reusing {out} (prepare.json present; --force rebuilds)")
        if changed:
            print(f"{PROG}: warning: it was built with other settings ({', '.join(changed)})",
                  file=sys.stderr)
        return 0

    counts = {s: len(corpus[s][SRC]) for s in SPLITS}
    print(f"{PROG}: {data} -> {out}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare.json").unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-staging-", dir=out))
    try:
        details = build(args, corpus, staging, files)
        tp.install(staging, out)
        record = {"args": settings(args, data), "lines": counts, **details,
                  "versions": {"python": sys.version.split()[0],
                               "sentencepiece": tp.package_version("sentencepiece"),
                               "fairseq": tp.package_version("fairseq-fixed")
                               or tp.package_version("fairseq")},
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
        tmp = out / ".prepare.json.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out / "prepare.json")
    except Exception as e:  # noqa: BLE001  (no marker: the next run redoes the work)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{PROG}: done: {out} (fairseq dict {record['fairseq_dict_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
