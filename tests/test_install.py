"""The plugin as a user installs it: ``--user-dir`` from any directory."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli


def user_dir_from(cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "fairseq_adaptive_moe"], cwd=cwd, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_module_prints_the_package_folder_from_any_directory(tmp_path):
    folder = Path(user_dir_from(tmp_path))
    assert folder == ROOT / "fairseq_adaptive_moe"
    assert (folder / "__init__.py").is_file() and (folder / "models").is_dir()


@pytest.mark.slow
def test_fairseq_train_finds_the_plugin_through_it(tmp_path):
    folder = user_dir_from(tmp_path)
    proc = run_cli("fairseq-train", "--user-dir", folder, "--task", "translation",
                   "--arch", "adaptive_moe_transformer_tiny", "--help", cwd=tmp_path)
    assert "--moe-gating" in proc.stdout and "--moe-threshold" in proc.stdout
