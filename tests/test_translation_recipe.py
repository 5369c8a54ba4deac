"""examples/translation recipe: prepare.py -> train.sh -> evaluate.sh on a slice of WMT19 de-en
(newstest2019 as test), and download_wmt19.py's offline failure and archive readers."""

import gzip
import io
import os
import re
import socket
import subprocess
import tarfile
import zipfile

import pytest

from conftest import BIN, ROOT, load_script, shared_data

pytestmark = pytest.mark.slow

RECIPE = ROOT / "examples" / "translation"
SIGNATURE = re.compile(r"sacreBLEU \d+\.\d\d  nrefs:1\|case:mixed\|eff:no\|tok:13a\|smooth:exp\|version:")
TINY = {"MAX_UPDATE": "3", "WARMUP": "1", "MAX_TOKENS": "1500", "LOG_INTERVAL": "1"}

download = load_script("examples/translation/download_wmt19.py")


def run(script, *args, **env):
    full_env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2", **env)
    return subprocess.run([str(RECIPE / script), *map(str, args)], env=full_env, text=True,
                          capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def wmt_bin(tmp_path_factory):
    """300 WMT news pairs for training; 21 lines (not a multiple of 8) of newstest2018/2019."""
    prepare = load_script("examples/translation/prepare.py")
    out = tmp_path_factory.mktemp("wmt19") / "data-bin"
    assert prepare.main(["--data", str(shared_data("wmt19-deen-news")), "--out", str(out),
                         "--vocab-size", "500", "--max-train-lines", "300",
                         "--max-eval-lines", "21"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(wmt_bin, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    for scheme in ("dense", "adaptive"):
        proc = run("train.sh", "--preset", "small", scheme, wmt_bin, runs / scheme, **TINY)
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return runs


def test_schemes_differ_only_in_gating(trained):
    commands = {s: (trained / s / "train-command.txt").read_text().split()
                for s in ("dense", "adaptive")}
    dense, adaptive = commands["dense"], commands["adaptive"]
    assert dense[dense.index("--moe-freq") + 1] == "0"
    assert adaptive[adaptive.index("--moe-gating") + 1] == "adaptive"
    assert adaptive[adaptive.index("--moe-threshold") + 1] == "0.1"
    strip = {"--moe-freq", "--moe-gating", "--moe-threshold"}

    def common(cmd, scheme):
        out, skip = [], False
        for tok in cmd:
            if skip:
                skip = False
            elif tok in strip:
                skip = True
            else:
                out.append(tok.replace(f"/{scheme}", "/SCHEME"))
        return out

    assert common(dense, "dense") == common(adaptive, "adaptive")
    for flag, value in (("--arch", "adaptive_moe_transformer_tiny"), ("--max-update", "3")):
        assert adaptive[adaptive.index(flag) + 1] == value
    assert "--cpu" in adaptive and "--fp16" not in adaptive
    for s in ("dense", "adaptive"):
        assert (trained / s / "checkpoint_last.pt").is_file()
        assert (trained / s / "train-finished").is_file()
        assert '"train_num_updates": "3"' in (trained / s / "train.log").read_text()


def test_evaluate_both_gatings_with_signature(wmt_bin, trained):
    proc = run("evaluate.sh", wmt_bin, trained / "adaptive" / "checkpoint_last.pt",
               "--max-len-b", "6", BEAM="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BLEU ")]
    assert len(lines) == 2, proc.stdout
    assert lines[0].startswith("BLEU test, top-1 gating: ")  # the paper's protocol first
    assert lines[1].startswith("BLEU test, training gating (adaptive T=0.1): ")
    for line in lines:
        assert SIGNATURE.search(line), line
        assert "had no output" not in line  # every newstest2019 line was translated
    out = trained / "adaptive" / "eval-test-checkpoint_last"
    for gating in ("top1", "train"):  # each gating passed explicitly, whatever the checkpoint saved
        text = (out / f"gen-{gating}.txt").read_text()
        assert len(re.findall(r"^D-\d+\t", text, flags=re.M)) == 21
        assert f"'moe_eval_gating': '{gating}'" in (out / f"gen-{gating}.log").read_text()


def test_evaluate_dense_skips_top1(wmt_bin, trained):
    proc = run("evaluate.sh", wmt_bin, trained / "dense" / "checkpoint_last.pt",
               "--max-len-b", "6", BEAM="1", OUT=str(trained / "dense-eval"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("BLEU ")]
    assert len(lines) == 2 and SIGNATURE.search(lines[0]) and lines[0].startswith("BLEU test, dense:")
    assert lines[1] == ("BLEU test, top-1 gating: skipped: dense checkpoint (--moe-freq 0), "
                        "it has no gate")
    assert not (trained / "dense-eval" / "gen-top1.txt").exists()


def test_finished_run_is_not_overwritten(wmt_bin, trained):
    ckpt = trained / "adaptive" / "checkpoint_last.pt"
    before = ckpt.stat().st_mtime_ns
    proc = run("train.sh", "adaptive", wmt_bin, trained / "adaptive", **TINY)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"train.sh: error: {trained / 'adaptive'} holds a finished run (train-finished); "
        "pass --force to retrain it from scratch"]
    assert ckpt.stat().st_mtime_ns == before


@pytest.mark.parametrize("args, message", [
    (["top3"], "unknown scheme 'top3' (choose dense, top1, top2 or adaptive)"),
    (["--preset", "big", "top1"], "unknown preset 'big' (choose small or wmt19)"),
])
def test_bad_scheme_or_preset(tmp_path, args, message):
    proc = run("train.sh", *args, tmp_path / "bin", tmp_path / "save")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"train.sh: error: {message}"]
    assert list(tmp_path.iterdir()) == []


def test_evaluate_missing_checkpoint(tmp_path):
    proc = run("evaluate.sh", tmp_path, tmp_path / "none.pt")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"evaluate.sh: error: no checkpoint at {tmp_path / 'none.pt'}"]


def offline(host):
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


@pytest.mark.skipif(not offline("data.statmt.org"), reason="online: the real download would run")
def test_download_fails_clearly_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SACREBLEU", str(tmp_path / "sacrebleu"))
    dest = tmp_path / "wmt19"
    assert download.main([str(dest), "--timeout", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("download_wmt19.py: error: cannot download https://data.statmt.org/")
    assert not dest.exists()  # nothing half-written, not even the folder

    # the training corpora: the URL is named and no .part file is left
    url = download.CORPORA["europarl"][0]
    with pytest.raises(download.InputError, match=re.escape(f"cannot download {url} (")):
        download.fetch(url, tmp_path / "archives" / "europarl.tsv.gz", timeout=5)
    assert not list((tmp_path / "archives").glob("*"))


def test_archive_readers(tmp_path):
    pairs = [("Guten Tag.", "Good day."), ("Zwei\tWörter", "Two words")]
    tsv = tmp_path / "c.tsv.gz"
    with gzip.open(tsv, "wt", encoding="utf-8") as f:
        f.writelines(f"{de}\t{en}\n" if "\t" not in de else f"Zwei Wörter\t{en}\n" for de, en in pairs)
    tmx = tmp_path / "c.tmx.gz"
    with gzip.open(tmx, "wt", encoding="utf-8") as f:
        f.write('<?xml version="1.0"?><tmx><body>' + "".join(
            f'<tu><tuv xml:lang="en"><seg>{en}</seg></tuv><tuv xml:lang="de"><seg>{de}</seg></tuv></tu>'
            for de, en in pairs) + "</body></tmx>")
    de_text = "".join(f"{de}\n" for de, _ in pairs).encode()
    en_text = "".join(f"{en}\n" for _, en in pairs).encode()
    tgz = tmp_path / "c.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in (("commoncrawl.de-en.de", de_text), ("commoncrawl.de-en.en", en_text)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    zp = tmp_path / "c.zip"
    with zipfile.ZipFile(zp, "w") as z:
        z.writestr("rapid2019.de-en.de", de_text)
        z.writestr("rapid2019.de-en.en", en_text)
    for kind, path in (("tsv", tsv), ("tmx", tmx), ("tgz", tgz), ("zip", zp)):
        staging = tmp_path / kind
        staging.mkdir()
        assert download.write_pairs(download.READERS[kind](path), staging, "train") == 2
        assert (staging / "train.de").read_text(encoding="utf-8") == "Guten Tag.\nZwei Wörter\n"
        assert (staging / "train.en").read_text(encoding="utf-8") == "Good day.\nTwo words\n"


def _value_of(cmd, flag):
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_train_and_demo_write_out_the_shared_flags(tmp_path):
    """train.sh and demo.sh spell the translation recipe out for a reader; the runners take it
    from experiments/flags.py. Every flag and value of the recipe appears in both."""
    import shlex

    from experiments import flags

    data = tmp_path / "bin"
    data.mkdir()
    (data / "dict.de.txt").write_text("")
    proc = run("train.sh", "adaptive", data, tmp_path / "save", DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    train = shlex.split(proc.stdout.strip())
    demo_text = (RECIPE / "demo.sh").read_text()
    block = demo_text[demo_text.index('"$bin/fairseq-train"'):demo_text.index("2>&1 | tee")]
    demo = shlex.split(block.replace("\\\n", " "))
    recipe = flags.translation_recipe("DATA", "adaptive_moe_transformer_tiny", "2e-3", 400)
    pairs = [(tok, recipe[i + 1] if i + 1 < len(recipe) and not recipe[i + 1].startswith("--")
              else None) for i, tok in enumerate(recipe) if tok.startswith("--")]
    assert ("--criterion", flags.CRITERION) in pairs and ("--dropout", "0.1") in pairs
    for flag, value in pairs:
        for name, cmd in (("train.sh", train), ("demo.sh", demo)):
            assert flag in cmd, (name, flag)
            if value is not None and flag != "--user-dir":
                assert _value_of(cmd, flag) == value, (name, flag, _value_of(cmd, flag), value)
    assert _value_of(train, "--user-dir") == str(flags.USER_DIR)
    assert train[train.index("--moe-gating"):] == flags.scheme_flags("adaptive", 0.1)
