import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

import cli_runner

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent
USER_DIR = str(ROOT / "fairseq_adaptive_moe")


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared data {path} is not present")
    return path


def load_script(relpath: str):
    """Import an example script (not a package module) by its path."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(tool: str, *args, cwd=None, check=True, timeout=600, input=None, fresh=False):
    """Run a console command of this venv (fairseq's or the plugin's); returns the
    CompletedProcess. The same command, arguments, directory, environment and exit status as a
    new process, forked from a server that has torch and fairseq imported (``cli_runner``);
    ``fresh=True`` starts a real new process."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "2")  # `make test` sets 1: its workers share the cores
    proc = cli_runner.run(tool, [str(a) for a in args], cwd=cwd, env=env, timeout=timeout,
                          input=input, fresh=fresh)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def shared_artifact(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built once per test run, by whichever process needs it first.

    Under pytest-xdist every worker has its own session, so a session fixture alone would build
    its data once per worker; this builds it once in the run's common temporary folder, under a
    file lock, and the other workers wait for it and reuse it. ``build(path)`` fills ``path``.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder the workers' own base folders share
    path = root / f"shared-{name}"
    with FileLock(str(path) + ".lock"):
        if not (path / ".complete").is_file():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            build(path)
            (path / ".complete").touch()
    return path


def prepare_m30k(tmp_path_factory, vocab_size: int, max_train: int, max_eval: int) -> Path:
    """A binarized slice of Multi30k de-en (joined sentencepiece dictionary), shared by every
    test (and worker) that asks for the same slice."""
    data = shared_data("multi30k-deen")

    def build(root: Path) -> None:
        prepare = load_script("examples/translation/prepare.py")
        rc = prepare.main(["--data", str(data), "--out", str(root / "data-bin"),
                           "--vocab-size", str(vocab_size), "--max-train-lines", str(max_train),
                           "--max-eval-lines", str(max_eval)])
        assert rc == 0

    return shared_artifact(tmp_path_factory, f"m30k-{vocab_size}-{max_train}-{max_eval}", build) / "data-bin"


#: the base of every tiny translation run in the tests (fairseq-train flags without DATA,
#: --arch, --criterion, --save-dir and --max-update)
TINY_TRANSLATION = [
    "--user-dir", USER_DIR, "--task", "translation", "--share-all-embeddings",
    "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "1500",
    "--cpu", "--seed", "3", "--log-format", "json", "--log-interval", "1", "--no-progress-bar",
    "--no-epoch-checkpoints",
]
MOE_TINY = ["--arch", "adaptive_moe_transformer_tiny",
            "--criterion", "adaptive_moe_label_smoothed_cross_entropy"]
DENSE_TINY = ["--arch", "transformer_tiny", "--criterion", "label_smoothed_cross_entropy"]
#: the tiny decoder-only MoE language model (without DATA, --save-dir and --max-update)
TINY_LM = [
    "--user-dir", USER_DIR, "--task", "language_modeling", "--arch", "adaptive_moe_transformer_lm_tiny",
    "--criterion", "adaptive_moe_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
    "--tokens-per-sample", "64", "--max-tokens", "1024", "--cpu", "--seed", "2",
    "--log-format", "json", "--log-interval", "1", "--no-progress-bar", "--no-epoch-checkpoints",
]


def train_shared(tmp_path_factory, name: str, data: Path, *flags) -> Path:
    """A fairseq-train run made once per test run (see :func:`shared_artifact`): its save dir,
    holding the checkpoints and ``train.log`` (stdout + stderr). Tests read it, never write it:
    copy it first to resume from it."""
    def build(root: Path) -> None:
        proc = run_cli("fairseq-train", data, *flags, "--save-dir", root)
        (root / "train.log").write_text(proc.stdout + proc.stderr)

    return shared_artifact(tmp_path_factory, name, build)


@pytest.fixture(scope="session")
def tiny_moe_run(m30k_bin, tmp_path_factory) -> Path:
    """adaptive_moe_transformer_tiny trained 6 updates on :func:`m30k_bin`: the checkpoint the
    generation, routing, upcycling and resume tests share."""
    return train_shared(tmp_path_factory, "tiny-moe", m30k_bin, *TINY_TRANSLATION, *MOE_TINY,
                        "--max-update", "6")


@pytest.fixture(scope="session")
def tiny_dense_run(m30k_bin, tmp_path_factory) -> Path:
    """The dense transformer_tiny, trained like :func:`tiny_moe_run`."""
    return train_shared(tmp_path_factory, "tiny-dense", m30k_bin, *TINY_TRANSLATION, *DENSE_TINY,
                        "--max-update", "6")


@pytest.fixture(scope="session")
def m30k_bin(tmp_path_factory):
    """3,000 training pairs, 60 valid/test pairs, sentencepiece 1000."""
    return prepare_m30k(tmp_path_factory, 1000, 3000, 60)


@pytest.fixture(scope="session")
def news_en_bin(tmp_path_factory):
    """The English side of WMT news, first 1,500 lines, binarized for language modeling (made
    once per test run, shared by every test and worker that asks for it)."""
    def build(root: Path) -> None:
        prepare = load_script("examples/translation/prepare.py")
        assert prepare.main(["--monolingual", "--src", "en", "--data",
                             str(shared_data("wmt19-deen-news")), "--out", str(root / "data-bin"),
                             "--vocab-size", "1000", "--max-train-lines", "1500",
                             "--max-eval-lines", "60"]) == 0

    out = shared_artifact(tmp_path_factory, "news-en-1000-1500-60", build) / "data-bin"
    assert (out / "dict.txt").is_file() and (out / "train.bin").is_file()
    return out


#: fixtures that prepare data or train a model: a test that uses one, directly or through
#: another fixture, belongs to the slow tier whatever its own marks say
SLOW_FIXTURES = {"m30k_bin", "tiny_bin", "tiny_moe_run", "tiny_dense_run", "news_en_bin"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
