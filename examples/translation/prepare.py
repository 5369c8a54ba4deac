#!/usr/bin/env python
"""Turn raw parallel text into fairseq binarized data (joint sentencepiece BPE).

Input
-----
A directory (``--data``) holding six aligned, one-sentence-per-line UTF-8
files::

    train.SRC  train.TGT  valid.SRC  valid.TGT  test.SRC  test.TGT

where SRC/TGT are the language codes given by ``--src``/``--tgt`` (default
``de``/``en``).  By default ``--data`` is ``<repo root>/../shared/data/
multi30k-deen``; with other data, pass ``--data PATH``.  Users online can
instead pass ``--download-multi30k DIR``, which fetches Multi30k's task-1 raw
files (train, val, test_2016_flickr) from its public repository into DIR and
uses them; offline, it fails with one line saying so.

Output (in ``--out``)
---------------------
``spm.model``, ``spm.vocab``
    One sentencepiece BPE model shared by both languages, trained on the
    (possibly truncated) train split of both sides.
``spm/{train,valid,test}.{SRC,TGT}``
    Every split encoded into space-separated sentencepiece pieces
    (the text fairseq-preprocess binarizes).
``raw/{valid,test}.{SRC,TGT}``
    The raw (possibly truncated) valid/test text, kept as references for
    sacrebleu scoring of detokenized (``--remove-bpe sentencepiece``) output.
``dict.SRC.txt``, ``dict.TGT.txt``, ``{split}.SRC-TGT.{SRC,TGT}.{bin,idx}``, ``preprocess.log``
    fairseq-preprocess output with a joined dictionary; point
    ``fairseq-train OUT`` at the directory.
``prepare.json``
    Arguments, versions and line counts.  Written last: its presence marks
    the output as complete.

Rerunning
---------
If ``OUT/prepare.json`` exists, the output is reused (the script says so and
exits 0, warning on stderr if it was built with different settings) unless
``--force`` is given.  Everything is built in a hidden
staging directory inside OUT and only moved into place once all steps
succeeded, so a failed run leaves no ``prepare.json`` and the next run
redoes the work.  Nothing outside OUT is ever written or deleted.

Exit status: 0 on success or reuse, 2 on bad arguments or missing/misaligned
input (one line on stderr, nothing written), 1 if a processing step fails.

Example (smoke test)::

    python examples/translation/prepare.py --out data-bin/smoke \\
        --max-train-lines 300 --max-eval-lines 50 --vocab-size 500
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from fairseq_adaptive_moe.data.prepare import (  # noqa: F401  (the shared steps, see that module)
    DOWNLOAD_ERRORS,
    EVAL_SPLITS,
    SPLITS,
    InputError,
    check_inputs,
    download_error,
    encode_splits,
    install,
    languages,
    load_corpus,
    package_version,
    read_record,
    run_preprocess,
    train_spm,
    write_lines,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "multi30k-deen"
PROG = "prepare.py"
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{name}.{lang}.gz"
MULTI30K_FILES = {"train": "train", "valid": "val", "test": "test_2016_flickr"}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Train a joint sentencepiece BPE model on raw parallel text, encode "
            "every split and binarize it with fairseq-preprocess "
            "(--joined-dictionary)."
        ),
        epilog=(
            "This machine is offline and nothing is downloaded. The default "
            f"--data is {DEFAULT_DATA}; users with other data give --data PATH "
            "(a directory with {train,valid,test}.{SRC,TGT} raw text files, "
            "one sentence per line, line-aligned)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="directory with {train,valid,test}.{SRC,TGT} raw text files",
    )
    p.add_argument(
        "--download-multi30k",
        type=Path,
        default=None,
        metavar="DIR",
        help="online only: fetch Multi30k task-1 raw text (train, val, test_2016_flickr) "
        "for --src/--tgt into DIR (files already there are kept) and use DIR as --data",
    )
    p.add_argument("--src", default="de", help="source language code (file suffix)")
    p.add_argument("--tgt", default="en", help="target language code (file suffix)")
    p.add_argument(
        "--monolingual",
        action="store_true",
        help="language-model data: only the --src files are read, and fairseq-preprocess "
        "runs with --only-source (output: dict.txt, {train,valid,test}.{bin,idx}, "
        "for fairseq's language_modeling task)",
    )
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=8000,
        help="joint sentencepiece vocabulary size (lowered automatically, with a "
        "message, if the training data is too small for it)",
    )
    p.add_argument(
        "--max-train-lines",
        type=int,
        default=None,
        help="use only the first N lines of the train split (smoke tests)",
    )
    p.add_argument(
        "--max-eval-lines",
        type=int,
        default=None,
        help="use only the first N lines of the valid and test splits (smoke tests)",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="worker processes for fairseq-preprocess"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if OUT/prepare.json marks a complete output",
    )
    args = p.parse_args(argv)

    if args.src == args.tgt and not args.monolingual:
        p.error("--src and --tgt must differ")
    for name in ("src", "tgt"):
        if not re.fullmatch(r"[A-Za-z0-9_]+", getattr(args, name)):
            p.error(f"--{name} must be a plain language code, got {getattr(args, name)!r}")
    if args.vocab_size < 1:
        p.error("--vocab-size must be positive")
    for name in ("max_train_lines", "max_eval_lines"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


# --------------------------------------------------------------------------- #
# input handling
# --------------------------------------------------------------------------- #


def download_multi30k(dest: Path, langs: Sequence[str], timeout: float = 20.0) -> None:
    """Fetch Multi30k task-1 raw files into ``dest/{split}.{lang}``; InputError when offline."""
    import gzip
    import urllib.request

    dest.mkdir(parents=True, exist_ok=True)
    for split, name in MULTI30K_FILES.items():
        for lang in langs:
            target = dest / f"{split}.{lang}"
            if target.is_file():
                continue
            url = MULTI30K_URL.format(name=name, lang=lang)
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    text = gzip.decompress(response.read())
            except DOWNLOAD_ERRORS as e:
                raise download_error(url, e, f"give --data PATH with "
                                     f"{{train,valid,test}}.{{{','.join(langs)}}} instead") from None
            part = target.with_name(target.name + ".part")
            part.write_bytes(text)
            os.replace(part, target)


def settings(args: argparse.Namespace, data: Path) -> dict:
    """The arguments that determine the output's content."""
    return {
        "data": str(data),
        "src": args.src,
        "tgt": args.tgt,
        "vocab_size": args.vocab_size,
        "monolingual": args.monolingual,
        "max_train_lines": args.max_train_lines,
        "max_eval_lines": args.max_eval_lines,
    }


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    src, tgt = args.src, (None if args.monolingual else args.tgt)
    data = args.data.expanduser().resolve()
    out = args.out.expanduser().resolve()

    try:
        if args.download_multi30k is not None:
            data = args.download_multi30k.expanduser().resolve()
            download_multi30k(data, languages(src, tgt))
        paths = check_inputs(data, src, tgt)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out exists and is not a directory: {out}")
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    record = None if args.force else read_record(out)
    if record is not None:
        print(f"{PROG}: reusing existing output in {out} (prepare.json present); "
              "pass --force to rebuild")
        old = record.get("args", {})
        diff = [f"{k}={old.get(k)!r} (now {v!r})" for k, v in settings(args, data).items()
                if old.get(k) != v]
        if diff:
            print(f"{PROG}: warning: existing output was built with different settings: "
                  + ", ".join(diff) + "; pass --force to rebuild with the new ones",
                  file=sys.stderr)
        return 0

    try:
        corpus = load_corpus(paths, src, tgt, args.max_train_lines, args.max_eval_lines)
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    counts = {s: len(corpus[s][src]) for s in SPLITS}
    print(f"{PROG}: {data} -> {out}  lines: " +
          ", ".join(f"{s}={n}" for s, n in counts.items()))

    out.mkdir(parents=True, exist_ok=True)
    marker = out / "prepare.json"
    # Invalidate first: from here until the new marker is written, the output
    # is incomplete, whatever happens.
    marker.unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-staging-", dir=out))
    try:
        threads = args.workers

        # (1) joint sentencepiece BPE on the train split of both languages
        train_text = staging / "spm-train.txt"
        write_lines(train_text, [line for lang in languages(src, tgt) for line in corpus["train"][lang]])
        print(f"{PROG}: [1/4] training sentencepiece BPE (vocab {args.vocab_size})")
        spm_opts = train_spm(train_text, staging / "spm", args.vocab_size, threads,
                             note=lambda msg: print(f"{PROG}: {msg}", file=sys.stderr))
        train_text.unlink()

        # (2) encode every split into pieces
        print(f"{PROG}: [2/4] encoding splits")
        spm_size = encode_splits(staging / "spm.model", corpus, staging / "spm", threads)

        # (3) raw eval references for sacrebleu
        print(f"{PROG}: [3/4] copying raw valid/test references")
        for split in EVAL_SPLITS:
            for lang in languages(src, tgt):
                write_lines(staging / "raw" / f"{split}.{lang}", corpus[split][lang])

        # (4) binarize with fairseq-preprocess
        mode = "--only-source" if tgt is None else "--joined-dictionary"
        print(f"{PROG}: [4/4] fairseq-preprocess ({mode}, workers {args.workers})")
        run_preprocess(staging / "spm", staging, src, tgt, args.workers)
        with open(staging / ("dict.txt" if tgt is None else f"dict.{src}.txt"), encoding="utf-8") as f:
            dict_size = sum(1 for _ in f)

        # (5) move into place, then write the completion marker last
        install(staging, out)
        record = {
            "args": {
                **settings(args, data),
                "out": str(out),
                "workers": args.workers,
                "force": args.force,
            },
            "lines": {s: {lang: counts[s] for lang in languages(src, tgt)} for s in SPLITS},
            "spm": {"vocab_size": spm_size, "options": spm_opts},
            "fairseq_dict_size": dict_size,
            "versions": {
                "python": sys.version.split()[0],
                "sentencepiece": package_version("sentencepiece"),
                "fairseq": package_version("fairseq-fixed") or package_version("fairseq"),
            },
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        tmp_marker = out / ".prepare.json.tmp"
        tmp_marker.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_marker, marker)
    except Exception as e:  # report and leave no marker; staging is removed below
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    print(f"{PROG}: done: {out} (spm vocab {spm_size}, fairseq dict {dict_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
