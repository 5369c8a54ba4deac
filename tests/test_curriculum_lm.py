"""The curriculum beyond translation: ``adaptive_moe_language_modeling`` trains and resumes
exactly, with ``--num-workers`` > 0; switching it on over a checkpoint without curriculum state;
sharded data directories (CPU)."""

import shutil

import pytest
import torch

import fairseq_adaptive_moe  # noqa: F401
from conftest import TINY_LM, run_cli
from test_curriculum import curriculum_lines
from test_curriculum import train_records as records

pytestmark = pytest.mark.slow

LM = [a if a != "language_modeling" else "adaptive_moe_language_modeling" for a in TINY_LM]
LM = [a if a != "1024" else "4096" for a in LM]  # --max-tokens: about 10 batches an epoch
CURRICULUM = ["--moe-curriculum", "--moe-curriculum-flush-updates", "3", "--disable-validation"]


def train(data, save, *extra):
    proc = run_cli("fairseq-train", data, *LM, *CURRICULUM, "--save-dir", save, *extra)
    return proc.stdout + proc.stderr


def test_lm_curriculum_trains_and_resumes_exactly_with_workers(news_en_bin, tmp_path):
    whole = train(news_en_bin, tmp_path / "a", "--max-epoch", "2", "--num-workers", "1")
    lines = curriculum_lines(whole)
    assert "epoch 001 | inactive" in lines[0] and "epoch 002 | active" in lines[-1], lines
    assert "(mean, window 1)" in lines[-1]
    got = records(whole)
    epochs = [int(r["epoch"]) for _, r in sorted(got.items())]
    cut = epochs.count(1) + epochs.count(2) // 2  # in the middle of the curriculum epoch
    assert epochs.count(2) >= 4

    first = train(news_en_bin, tmp_path / "b", "--max-epoch", "2", "--num-workers", "1",
                  "--max-update", str(cut))
    resumed = train(news_en_bin, tmp_path / "b", "--max-epoch", "2", "--num-workers", "1")
    assert f"(epoch 2 @ {cut} updates)" in resumed
    both = {**records(first), **records(resumed)}
    assert both == got  # same batches and losses, update by update

    a, b = (torch.load(tmp_path / d / "checkpoint_last.pt", weights_only=True) for d in "ab")
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    state_a, state_b = (c["extra_state"]["train_iterator"]["moe_curriculum"] for c in (a, b))
    assert torch.equal(state_a["tracker"]["multi"], state_b["tracker"]["multi"])
    assert torch.equal(state_a["tracker"]["tokens"], state_b["tracker"]["tokens"])
    blocks = state_a["tracker"]["num_samples"]
    # every block trained on has its row (fairseq's batching leaves a few of the 1,100 out)
    assert int((state_a["tracker"]["tokens"].sum(1) > 0).sum()) >= 0.99 * blocks
    assert state_a["tracker"]["multi"].shape[1] == 2  # one column per MoE layer


def test_switching_the_curriculum_on_over_a_plain_checkpoint(news_en_bin, tmp_path):
    plain = run_cli("fairseq-train", news_en_bin, *LM, "--disable-validation", "--save-dir",
                    tmp_path / "ckpt", "--max-epoch", "1")
    assert "moe curriculum" not in plain.stdout + plain.stderr
    log = train(news_en_bin, tmp_path / "ckpt", "--max-epoch", "3")
    assert "the checkpoint has no curriculum statistics; collecting from here" in log
    lines = curriculum_lines(log)
    # epoch 2 has nothing to order by yet (its batches in length order) and collects; epoch 3 is
    # ordered by what it collected
    assert "epoch 002 | active" in lines[0] and "no statistics yet" in lines[0], lines
    assert "epoch 003 | active" in lines[-1] and "batch 2x share" in lines[-1], lines
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=True)
    tracker = state["extra_state"]["train_iterator"]["moe_curriculum"]["tracker"]
    assert int((tracker["tokens"].sum(1) > 0).sum()) >= 0.99 * tracker["num_samples"]


def test_sharded_data_keeps_one_tracker_per_shard(news_en_bin, tmp_path):
    shards = [tmp_path / "shard0", tmp_path / "shard1"]
    for shard in shards:
        shutil.copytree(news_en_bin, shard)
    log = train(f"{shards[0]}:{shards[1]}", tmp_path / "ckpt", "--max-epoch", "3",
                "--moe-curriculum-start-epoch", "3")
    lines = curriculum_lines(log)
    # epochs 1 and 2 train shards 0 and 1 in fairseq's order; epoch 3 is shard 0 again, ordered
    # by what epoch 1 collected on it
    assert [line.split(" | ")[1].split(",")[0] for line in lines] == [
        "inactive until epoch 3", "inactive until epoch 3", "active"], lines
    assert "batch 2x share" in lines[-1]
    state = torch.load(tmp_path / "ckpt" / "checkpoint_last.pt", weights_only=True)
    saved = state["extra_state"]["train_iterator"]["moe_curriculum"]["shards"]
    assert sorted(saved) == ["0", "1"]
    for tracker in saved.values():
        assert int((tracker["tokens"].sum(1) > 0).sum()) >= 0.99 * tracker["num_samples"]
