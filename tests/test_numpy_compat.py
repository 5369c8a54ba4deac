"""fairseq paths that read NumPy names removed in NumPy 2 work with the plugin loaded."""

import os
import subprocess
import sys

import pytest

from conftest import MOE_TINY, TINY_LM, TINY_TRANSLATION, run_cli

pytestmark = pytest.mark.slow

LM = [*TINY_LM, "--no-save", "--max-update", "2"]
MT = [*TINY_TRANSLATION, *MOE_TINY, "--no-save", "--max-update", "2"]


@pytest.fixture(scope="module")
def english_lm_bin(m30k_bin, tmp_path_factory):
    """The English side of the Multi30k data-bin, laid out as a language-modelling data-bin."""
    out = tmp_path_factory.mktemp("lm-en")
    os.symlink(m30k_bin / "dict.en.txt", out / "dict.txt")
    for split in ("train", "valid"):
        for ext in ("bin", "idx"):
            os.symlink(m30k_bin / f"{split}.de-en.en.{ext}", out / f"{split}.{ext}")
    return out


def test_language_model_with_sample_break_mode_eos(english_lm_bin):
    proc = run_cli("fairseq-train", english_lm_bin, *LM, "--sample-break-mode", "eos")
    assert '"num_updates": "2"' in proc.stdout + proc.stderr


def test_translation_with_num_batch_buckets(m30k_bin):
    proc = run_cli("fairseq-train", m30k_bin, *MT, "--num-batch-buckets", "4")
    assert '"num_updates": "2"' in proc.stdout + proc.stderr


@pytest.mark.parametrize("with_plugin", [False, True])
def test_token_block_dataset_needs_the_aliases(with_plugin):
    """Without the plugin, fairseq's eos-break TokenBlockDataset fails under NumPy 2 (the test
    proves the shim is what makes it work); with it, it builds."""
    code = (
        ("import fairseq_adaptive_moe.numpy_compat\n" if with_plugin else "")
        + "import numpy as np, torch\n"
        "from fairseq.data import TokenBlockDataset\n"
        "data = [torch.tensor([4, 5, 2]), torch.tensor([6, 2])]\n"
        "ds = TokenBlockDataset(data, np.array([3, 2]), block_size=8, pad=1, eos=2,\n"
        "                       break_mode='eos')\n"
        "print('blocks', len(ds))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    import numpy as np

    if with_plugin or int(np.__version__.split(".")[0]) < 2:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "blocks 2" in proc.stdout
    else:
        assert proc.returncode != 0 and "np.compat" in proc.stderr
