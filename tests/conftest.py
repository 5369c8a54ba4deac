import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def run_cli(tool: str, *args, cwd=None, check=True, timeout=600, input=None):
    """Run a fairseq console script of this venv; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    proc = subprocess.run([str(BIN / tool), *map(str, args)], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def prepare_m30k(tmp_path_factory, vocab_size: int, max_train: int, max_eval: int) -> Path:
    """A binarized slice of Multi30k de-en (joined sentencepiece dictionary)."""
    prepare = load_script("examples/translation/prepare.py")
    out = tmp_path_factory.mktemp(f"m30k-{max_train}") / "data-bin"
    rc = prepare.main(["--data", str(shared_data("multi30k-deen")), "--out", str(out),
                       "--vocab-size", str(vocab_size), "--max-train-lines", str(max_train),
                       "--max-eval-lines", str(max_eval)])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def m30k_bin(tmp_path_factory):
    """3,000 training pairs, 60 valid/test pairs, sentencepiece 1000."""
    return prepare_m30k(tmp_path_factory, 1000, 3000, 60)
