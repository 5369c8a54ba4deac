#!/usr/bin/env python
"""Fetch WMT19 de-en (online users): raw {train,valid,test}.{de,en} in DIR for prepare.py.

    python examples/translation/download_wmt19.py DIR
    python examples/translation/prepare.py --data DIR --out data-bin/wmt19 --vocab-size 32000

- train: the WMT19 news task's de-en parallel corpora, concatenated in this order: Europarl v9,
  ParaCrawl v3 (bicleaner 0.7 filtered TMX), Common Crawl, News Commentary v14, Wiki Titles v1,
  and Rapid 2019 (``--corpora`` picks a subset). Pairs with an empty side are dropped; nothing
  else is filtered (FSMT also filtered by language id and added back-translations; that is not
  done here).
- valid: newstest2018 de-en; test: newstest2019 de-en (German-original), both through sacreBLEU
  (``sacrebleu -t wmt18|wmt19 -l de-en --echo src|ref``), which caches them in ``~/.sacrebleu``.

Archives are kept in ``DIR/archives/`` (a complete file each: written as ``.part`` and renamed),
so a rerun after a network failure fetches only what is missing. The six output files are built
in a staging folder and moved into DIR together at the end, followed by ``DIR/download.json``;
DIR with ``download.json`` is reused unless ``--force``. A URL that cannot be reached stops the
run with one line naming it and exit status 2, and no output file is written.
"""

import argparse
import contextlib
import gzip
import json
import os
import shutil
import socket
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from fairseq_adaptive_moe.data.prepare import DOWNLOAD_ERRORS, SPLITS, InputError, download_error

PROG = "download_wmt19.py"
LANGS = ("de", "en")
HINT = "run this where the internet is reachable, or give prepare.py --data PATH with raw text"
# name -> (url, archive kind); every one is de-en, German first where the format has an order
CORPORA = {
    "europarl": ("http://www.statmt.org/europarl/v9/training/europarl-v9.de-en.tsv.gz", "tsv"),
    "paracrawl": ("https://s3.amazonaws.com/web-language-models/paracrawl/release3/"
                  "en-de.bicleaner07.tmx.gz", "tmx"),
    "commoncrawl": ("http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz", "tgz"),
    "newscommentary": ("http://data.statmt.org/news-commentary/v14/training/"
                       "news-commentary-v14.de-en.tsv.gz", "tsv"),
    "wikititles": ("http://data.statmt.org/wikititles/v1/wikititles-v1.de-en.tsv.gz", "tsv"),
    "rapid": ("https://s3-eu-west-1.amazonaws.com/tilde-model/rapid2019.de-en.zip", "zip"),
}
EVAL_SETS = {"valid": "wmt18", "test": "wmt19"}  # sacreBLEU test-set names, language pair de-en


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("dest", type=Path, help="output folder for {train,valid,test}.{de,en}")
    p.add_argument("--corpora", default=",".join(CORPORA),
                   help="comma-separated training corpora (default: all: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait on a connection before giving up (default 60)")
    p.add_argument("--force", action="store_true", help="rebuild DIR's files even if complete")
    args = p.parse_args(argv)
    args.corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    unknown = [c for c in args.corpora if c not in CORPORA]
    if unknown or not args.corpora:
        p.error(f"unknown corpus {', '.join(unknown) or '(none given)'} "
                f"(choose from {', '.join(CORPORA)})")
    if not args.timeout > 0:
        p.error("--timeout must be > 0")
    return args


def fetch(url: str, target: Path, timeout: float) -> Path:
    """Download ``url`` to ``target`` unless it is there; InputError naming the URL if it fails."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    print(f"{PROG}: fetching {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except DOWNLOAD_ERRORS as e:
        part.unlink(missing_ok=True)
        raise download_error(url, e, HINT) from None
    os.replace(part, target)
    return target


# --------------------------------------------------------------------------- #
# readers: archive -> (de, en) pairs
# --------------------------------------------------------------------------- #

def read_tsv(path: Path):
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 2:
                yield cols[0], cols[1]


def read_tmx(path: Path):
    import xml.etree.ElementTree as ET

    lang_key = "{http://www.w3.org/XML/1998/namespace}lang"
    with gzip.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag != "tu":
                continue
            segs = {}
            for tuv in elem.iter("tuv"):
                lang = (tuv.get(lang_key) or tuv.get("lang") or "").lower()[:2]
                seg = tuv.find("seg")
                if seg is not None:
                    segs[lang] = "".join(seg.itertext())
            if "de" in segs and "en" in segs:
                yield segs["de"], segs["en"]
            elem.clear()


def parallel_members(names):
    """{lang: member} for the de-en pair of files in an archive (``*de-en.de``, ``*de-en.en``)."""
    found = {lang: [n for n in names if n.endswith(f"de-en.{lang}")] for lang in LANGS}
    if not all(len(v) == 1 for v in found.values()):
        raise InputError(f"archive layout not understood: de-en members {found}")
    return {lang: v[0] for lang, v in found.items()}


def zip_pairs(de_lines, en_lines):
    for de, en in zip(de_lines, en_lines, strict=True):  # ValueError if the files are not aligned
        yield de.decode("utf-8", "replace").rstrip("\n"), en.decode("utf-8", "replace").rstrip("\n")


def read_tgz(path: Path):
    with tarfile.open(path) as tar:
        members = parallel_members(tar.getnames())
        with tar.extractfile(members["de"]) as de, tar.extractfile(members["en"]) as en:
            yield from zip_pairs(de, en)


def read_zip(path: Path):
    with zipfile.ZipFile(path) as z:
        members = parallel_members(z.namelist())
        with z.open(members["de"]) as de, z.open(members["en"]) as en:
            yield from zip_pairs(de, en)


READERS = {"tsv": read_tsv, "tmx": read_tmx, "tgz": read_tgz, "zip": read_zip}


def clean(text: str) -> str:
    return " ".join(text.split())  # one line: tabs, newlines and runs of spaces become one space


def write_pairs(pairs, staging: Path, split: str, mode: str = "w") -> int:
    n = 0
    with open(staging / f"{split}.de", mode, encoding="utf-8", newline="\n") as fde, \
            open(staging / f"{split}.en", mode, encoding="utf-8", newline="\n") as fen:
        for de, en in pairs:
            de, en = clean(de), clean(en)
            if de and en:
                fde.write(de + "\n")
                fen.write(en + "\n")
                n += 1
    return n


def eval_pairs(test_set: str, timeout: float):
    """Source and reference lines of a sacreBLEU test set (downloaded into its cache)."""
    from sacrebleu.dataset import DATASETS

    dataset = DATASETS[test_set]
    url = dataset.data[0]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # sacreBLEU's urlopen takes the default
    try:
        with contextlib.redirect_stdout(sys.stderr):
            src, ref = dataset.get_files("de-en")[:2]
    except (Exception, SystemExit) as e:  # sacreBLEU exits or raises on a failed download
        raise download_error(url, e, HINT + f" (sacrebleu -t {test_set} -l de-en)") from None
    finally:
        socket.setdefaulttimeout(old)
    with open(src, encoding="utf-8") as fs, open(ref, encoding="utf-8") as fr:
        return list(zip(fs.read().splitlines(), fr.read().splitlines()))


def main(argv=None) -> int:
    args = parse_args(argv)
    dest = args.dest.expanduser().resolve()
    if dest.exists() and not dest.is_dir():
        print(f"{PROG}: error: {dest} exists and is not a directory", file=sys.stderr)
        return 2
    if (dest / "download.json").is_file() and not args.force:
        print(f"{PROG}: {dest} is complete (download.json); pass --force to rebuild")
        return 0
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-staging-", dir=dest))
    try:
        # every network access first, so that an offline run fails before any output is built
        evals = {split: eval_pairs(name, args.timeout) for split, name in EVAL_SETS.items()}
        archives = {c: fetch(CORPORA[c][0], dest / "archives" / CORPORA[c][0].rsplit("/", 1)[1],
                             args.timeout) for c in args.corpora}
        counts = {"train": {}}
        for c in args.corpora:
            print(f"{PROG}: extracting {c}", flush=True)
            counts["train"][c] = write_pairs(READERS[CORPORA[c][1]](archives[c]), staging,
                                             "train", "a")
        for split, pairs in evals.items():
            counts[split] = write_pairs(pairs, staging, split)
        (dest / "download.json").unlink(missing_ok=True)
        for split in SPLITS:
            for lang in LANGS:
                os.replace(staging / f"{split}.{lang}", dest / f"{split}.{lang}")
        record = {"corpora": {c: CORPORA[c][0] for c in args.corpora}, "eval_sets": EVAL_SETS,
                  "lines": counts}
        (dest / "download.json").write_text(json.dumps(record, indent=1) + "\n")
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, EOFError, ValueError, tarfile.TarError, zipfile.BadZipFile) as e:
        print(f"{PROG}: error: reading an archive in {dest / 'archives'} failed ({e}); "
              "delete it and rerun", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(dest.iterdir()):
            dest.rmdir()
    total = sum(counts["train"].values())
    print(f"{PROG}: done: {dest}: train {total} pairs ({counts['train']}), "
          f"valid {counts['valid']}, test {counts['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
