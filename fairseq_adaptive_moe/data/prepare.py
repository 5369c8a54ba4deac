"""Raw text to a fairseq data-bin, and fairseq-generate output back to text: the helpers that the
examples' prepare and score scripts share.

``examples/translation/prepare.py`` (parallel text, joint sentencepiece BPE) and
``examples/summarization/prepare.py`` (articles and summaries, sentencepiece or BART's GPT-2 BPE)
both read line-aligned ``{train,valid,test}.{SRC,TGT}`` files (:func:`check_inputs`,
:func:`load_corpus`), train and apply sentencepiece (:func:`train_spm`, :func:`encode_splits`),
binarize with fairseq-preprocess (:func:`run_preprocess`), build into a staging folder that
:func:`install` moves into place, and mark a finished output with ``prepare.json``
(:func:`read_record`). Both ``score.py`` scripts read fairseq-generate's hypotheses with
:func:`read_hypotheses`.

Only the standard library is imported here; sentencepiece is imported by the functions that use
it. Problems with the user's input raise :class:`InputError` (the scripts print it as one line and
exit with status 2); a failing processing step raises RuntimeError.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

SPLITS = ("train", "valid", "test")
EVAL_SPLITS = ("valid", "test")
DOWNLOAD_ERRORS = (OSError, EOFError)  # urllib.error.URLError and socket timeouts are OSErrors


class InputError(Exception):
    """Problem with the user's input; reported as one line, exit status 2."""


def download_error(url: str, error: BaseException, hint: str) -> InputError:
    """The one-line error for a URL that could not be fetched."""
    reason = getattr(error, "reason", None) or error
    return InputError(f"cannot download {url} ({reason}); offline? {hint}")


# --------------------------------------------------------------------------- #
# input
# --------------------------------------------------------------------------- #


def languages(src: str, tgt: Optional[str]) -> List[str]:
    """The file suffixes read: ``[src]`` for monolingual data (``tgt`` None), else both."""
    return [src] if tgt is None else [src, tgt]


def input_paths(data: Path, src: str, tgt: Optional[str]) -> Dict[str, Dict[str, Path]]:
    return {s: {lang: data / f"{s}.{lang}" for lang in languages(src, tgt)} for s in SPLITS}


def check_inputs(data: Path, src: str, tgt: Optional[str]) -> Dict[str, Dict[str, Path]]:
    """Return the input paths; raise InputError naming what is missing."""
    if not data.is_dir():
        raise InputError(
            f"data directory not found: {data} (give --data PATH with "
            f"{{train,valid,test}}.{{{','.join(languages(src, tgt))}}})"
        )
    paths = input_paths(data, src, tgt)
    missing = [str(p) for s in SPLITS for p in paths[s].values() if not p.is_file()]
    if missing:
        raise InputError(
            f"missing input file{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"
        )
    return paths


def read_lines(path: Path, limit: Optional[int]) -> List[str]:
    """First ``limit`` lines of ``path`` (all if None), without line endings.

    Text mode with universal newlines, the same way fairseq-preprocess and
    sacrebleu read files, so line counts agree with theirs.
    """
    out: List[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            out.append(line.rstrip("\n"))
    return out


def load_corpus(
    paths: Dict[str, Dict[str, Path]], src: str, tgt: Optional[str],
    max_train: Optional[int], max_eval: Optional[int],
) -> Dict[str, Dict[str, List[str]]]:
    """``{split: {lang: lines}}``, the train split cut at ``max_train`` lines and valid/test at
    ``max_eval``; InputError for text that is not UTF-8, misaligned or empty."""
    corpus: Dict[str, Dict[str, List[str]]] = {}
    for split in SPLITS:
        limit = max_train if split == "train" else max_eval
        try:
            corpus[split] = {lang: read_lines(paths[split][lang], limit)
                             for lang in languages(src, tgt)}
        except UnicodeDecodeError as e:
            raise InputError(f"input is not UTF-8: {e}") from e
        n_src = len(corpus[split][src])
        n_tgt = n_src if tgt is None else len(corpus[split][tgt])
        if n_src != n_tgt:
            raise InputError(
                f"{split} split is not aligned: {paths[split][src]} has {n_src} lines, "
                f"{paths[split][tgt]} has {n_tgt}"
            )
        if n_src == 0:
            raise InputError(f"{split} split is empty: {paths[split][src]}")
    return corpus


def write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line)
            f.write("\n")


# --------------------------------------------------------------------------- #
# processing steps
# --------------------------------------------------------------------------- #


def train_spm(train_text: Path, model_prefix: Path, vocab_size: int, threads: int,
              note: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> dict:
    """Train a sentencepiece BPE model (``model_prefix.model`` / ``.vocab``) on ``train_text``;
    returns the options actually used. When the text is too small for ``vocab_size``, ``note``
    gets one line saying so and training is retried with ``hard_vocab_limit=False``."""
    import sentencepiece as spm

    opts = dict(
        input=str(train_text),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        # Deterministic: read sentences in file order, no random sampling
        # (sentencepiece has no seed option for BPE training).
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=threads,
        minloglevel=2,
    )
    try:
        spm.SentencePieceTrainer.train(**opts)
    except RuntimeError as e:
        if "Vocabulary size too high" not in str(e):
            raise
        m = re.search(r"<=\s*(\d+)", str(e))
        limit = f" (at most {m.group(1)})" if m else ""
        note(f"note: training data too small for --vocab-size {vocab_size}{limit}; "
             "retrying with hard_vocab_limit=False")
        opts["hard_vocab_limit"] = False
        spm.SentencePieceTrainer.train(**opts)
    opts = {k: v for k, v in opts.items() if k not in ("input", "model_prefix")}
    return opts


def encode_splits(
    model: Path, corpus: Dict[str, Dict[str, List[str]]], out_dir: Path, threads: int
) -> int:
    """Write every split of ``corpus`` as space-separated pieces to ``out_dir/{split}.{lang}``;
    returns the model's vocabulary size."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    for split, by_lang in corpus.items():
        for lang, lines in by_lang.items():
            pieces = sp.encode(lines, out_type=str, num_threads=threads)
            write_lines(out_dir / f"{split}.{lang}", [" ".join(p) for p in pieces])
    return sp.get_piece_size()


def preprocess_command() -> List[str]:
    """fairseq-preprocess of this Python's environment."""
    exe = Path(sys.executable).parent / "fairseq-preprocess"
    if exe.is_file() and os.access(exe, os.X_OK):
        return [str(exe)]
    return [sys.executable, "-m", "fairseq_cli.preprocess"]


def run_preprocess(spm_dir: Path, dest: Path, src: str, tgt: Optional[str], workers: int) -> None:
    """fairseq-preprocess ``spm_dir/{split}.{lang}`` into ``dest``: a joined dictionary for a
    language pair, ``--only-source`` for monolingual data (``tgt`` None). RuntimeError with the
    end of its output if it fails."""
    if tgt is None:  # language modeling: {split}.{src} -> {split}.bin/idx and dict.txt
        langs = ["--only-source"]
        prefixes = {s: str(spm_dir / f"{s}.{src}") for s in SPLITS}
    else:
        langs = ["--source-lang", src, "--target-lang", tgt, "--joined-dictionary"]
        prefixes = {s: str(spm_dir / s) for s in SPLITS}
    cmd = preprocess_command() + langs + [
        "--trainpref", prefixes["train"],
        "--validpref", prefixes["valid"],
        "--testpref", prefixes["test"],
        "--destdir", str(dest),
        "--workers", str(workers),
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-30:])
        raise RuntimeError(
            f"fairseq-preprocess failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}"
        )


def package_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #


def read_record(out: Path) -> Optional[dict]:
    """The parsed ``OUT/prepare.json`` if the output is complete, else None."""
    import json

    try:
        record = json.loads((out / "prepare.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def install(staging: Path, out: Path) -> None:
    """Move every file from ``staging`` into ``out`` (overwriting same names)."""
    for src_path in sorted(staging.rglob("*")):
        if src_path.is_file():
            dst = out / src_path.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src_path, dst)


def read_hypotheses(path) -> Dict[int, str]:
    """``{sentence id: text}`` from fairseq-generate's detokenized ``D-<id>`` lines."""
    hyps = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("D-"):
                head, _score, text = line.rstrip("\n").split("\t", 2)
                hyps[int(head[2:])] = text
    return hyps
