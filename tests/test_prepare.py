"""Smoke test for examples/translation/prepare.py on a slice of Multi30k de-en, and the shared
steps in fairseq_adaptive_moe.data.prepare."""

import json
import time

import pytest

from conftest import SHARED_DATA, load_script
from fairseq_adaptive_moe.data import prepare as shared

DATA = SHARED_DATA / "multi30k-deen"


def load_prepare():
    return load_script("examples/translation/prepare.py")


@pytest.fixture(scope="module")
def prepare():
    return load_prepare()


@pytest.mark.slow
def test_prepare_end_to_end(prepare, tmp_path, capsys, monkeypatch):
    if not DATA.is_dir():
        pytest.skip(f"Multi30k data not found at {DATA}")
    out = tmp_path / "bin"
    argv = [
        "--data", str(DATA), "--out", str(out),
        "--max-train-lines", "300", "--max-eval-lines", "50",
        "--vocab-size", "500", "--workers", "2",
    ]
    assert prepare.main(argv) == 0

    for name in ("dict.de.txt", "dict.en.txt", "train.de-en.de.bin", "test.de-en.en.idx",
                 "valid.de-en.en.bin", "spm.model", "spm.vocab", "raw/test.en",
                 "spm/train.de", "prepare.json"):
        assert (out / name).is_file(), name
    # no staging leftovers
    assert not [p for p in out.iterdir() if p.name.startswith(".prepare")]

    raw_test = (out / "raw" / "test.en").read_text(encoding="utf-8").splitlines()
    assert len(raw_test) == 50
    expected_first = (DATA / "test.en").read_text(encoding="utf-8").splitlines()[0]
    assert raw_test[0] == expected_first

    record = json.loads((out / "prepare.json").read_text(encoding="utf-8"))
    assert record["lines"] == {
        "train": {"de": 300, "en": 300},
        "valid": {"de": 50, "en": 50},
        "test": {"de": 50, "en": 50},
    }
    assert record["args"]["vocab_size"] == 500
    for split, n in (("train", 300), ("valid", 50), ("test", 50)):
        for lang in ("de", "en"):
            lines = (out / "spm" / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()
            assert len(lines) == n
    capsys.readouterr()

    # second run without --force: reused, fast, untouched
    mtime = (out / "prepare.json").stat().st_mtime_ns
    t0 = time.monotonic()
    assert prepare.main(argv) == 0
    assert time.monotonic() - t0 < 5
    assert "reusing" in capsys.readouterr().out
    assert (out / "prepare.json").stat().st_mtime_ns == mtime

    # reuse with different settings still exits 0 but warns
    assert prepare.main(argv[:-4] + ["--vocab-size", "600", "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "reusing" in captured.out and "vocab_size" in captured.err

    # a failing --force rebuild leaves no prepare.json and no staging dir
    def boom(*a, **k):
        raise RuntimeError("simulated fairseq-preprocess failure")

    monkeypatch.setattr(prepare, "run_preprocess", boom)
    assert prepare.main(argv + ["--force"]) == 1
    assert "simulated" in capsys.readouterr().err
    assert not (out / "prepare.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".prepare")]


def test_missing_data_exits_2(prepare, tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    out = tmp_path / "out"
    assert prepare.main(["--data", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_file_exits_2(prepare, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            if (split, lang) != ("test", "en"):
                (data / f"{split}.{lang}").write_text("a\n", encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    assert prepare.main(["--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(data / "test.en") in err
    assert len(err.strip().splitlines()) == 1
    assert list(out.iterdir()) == []


def test_download_fails_cleanly_when_offline(tmp_path, capsys, monkeypatch):
    prepare = load_prepare()
    # a closed local port: the same refusal an offline machine gets, without touching the network
    monkeypatch.setattr(prepare, "MULTI30K_URL", "http://127.0.0.1:9/{name}.{lang}.gz")
    out = tmp_path / "out"
    rc = prepare.main(["--download-multi30k", str(tmp_path / "raw"), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot download" in err[0] and "--data PATH" in err[0]
    assert not out.exists()
    assert not list((tmp_path / "raw").glob("*.de"))  # nothing half-written


def test_both_prepare_scripts_use_the_shared_steps():
    """One implementation of each step: the scripts import it from the library."""
    translation = load_prepare()
    summarization = load_script("examples/summarization/prepare.py")
    for name in ("check_inputs", "load_corpus", "train_spm", "encode_splits", "run_preprocess",
                 "install", "read_record", "InputError"):
        assert getattr(translation, name) is getattr(shared, name)
    assert summarization.tp is shared and summarization.InputError is shared.InputError
    download = load_script("examples/translation/download_wmt19.py")
    assert download.download_error is shared.download_error


def test_read_hypotheses_is_shared_by_both_score_scripts(tmp_path):
    gen = tmp_path / "gen.txt"
    gen.write_text("S-1\tsrc\nH-1\t-0.5\tpieces\nD-1\t-0.5\tHello world.\nD-0\t-0.1\tHi\n")
    assert shared.read_hypotheses(gen) == {1: "Hello world.", 0: "Hi"}
    for script in ("examples/translation/score.py", "examples/summarization/score.py"):
        assert load_script(script).read_hypotheses is shared.read_hypotheses


def test_a_vocabulary_too_large_is_noted_and_retried(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("a b c\nb c d\n" * 20)
    notes = []
    opts = shared.train_spm(text, tmp_path / "spm", 500, 1, note=notes.append)
    assert opts["hard_vocab_limit"] is False and (tmp_path / "spm.model").is_file()
    assert len(notes) == 1 and "too small for --vocab-size 500" in notes[0]
