"""The criterion's MoE logging: device tensors in the forward, one read per step at reduce time."""

import pytest
import torch
from fairseq import metrics

from fairseq_adaptive_moe.criterions import moe_logging_output, reduce_moe_metrics
from fairseq_adaptive_moe.moe import ExpertFFN, MoELayer, TopKGate


def layer_stats(name, seed, tokens=30):
    torch.manual_seed(seed)
    layer = MoELayer(TopKGate(8, 4, "adaptive", threshold=0.2), ExpertFFN(4, 8, 16, seed=seed),
                     name=name)
    return layer(torch.randn(tokens, 8))[1]


def test_logging_output_stays_on_the_device():
    """No host read in the forward: every per-layer entry is a 0-d tensor (a float here would
    mean a ``.tolist()`` / ``.item()`` between forward and backward)."""
    log = moe_logging_output([layer_stats("encoder.0", 0), layer_stats("decoder.1", 1)])
    assert {k for k in log} >= {"moe_tokens_enc0", "moe_multi_dec1", "moe_slots_enc0"}
    for key, value in log.items():
        assert torch.is_tensor(value) and value.dim() == 0, key


def test_reduce_reads_tensors_and_derives_ratios():
    batches = [[layer_stats("encoder.0", s), layer_stats("decoder.0", s + 10)] for s in range(3)]
    logs = [dict(moe_logging_output(b), moe_loss=torch.tensor(0.5)) for b in batches]
    multi = sum(int(s.num_multi) for b in batches for s in b)
    tokens = sum(int(s.num_tokens) for b in batches for s in b)
    enc_multi = sum(int(b[0].num_multi) for b in batches)
    with metrics.aggregate() as agg:
        reduce_moe_metrics(logs, sample_size=3)
    values = agg.get_smoothed_values()
    assert values["moe_2x"] == pytest.approx(round(multi / tokens, 4))
    assert values["moe_2x_enc0"] == pytest.approx(round(enc_multi / 90, 4))
    assert values["moe_loss"] == pytest.approx(0.5)
    assert isinstance(values["moe_2x"], float)


def test_rank_imbalance_travels_with_fairseqs_reduction(monkeypatch):
    """Each rank fills its own ``moe_rankslots_r<rank>`` key (zeros under the others'); fairseq
    sums logging outputs key by key over ranks; the reduction derives the busiest rank's slots
    over the mean. One rank: no keys, no figure."""
    from fairseq.distributed import utils as distributed_utils

    assert not any(k.startswith("moe_rankslots") for k in
                   moe_logging_output([layer_stats("encoder.0", 0)]))
    monkeypatch.setattr(distributed_utils, "get_data_parallel_world_size", lambda: 2)
    per_rank = []
    for rank, tokens in ((0, 30), (1, 90)):  # rank 1 routes three times the tokens
        monkeypatch.setattr(distributed_utils, "get_data_parallel_rank", lambda r=rank: r)
        stats = [layer_stats("encoder.0", rank, tokens), layer_stats("decoder.0", rank, tokens)]
        log = moe_logging_output(stats)
        slots = sum(float(s.expert_load.sum()) for s in stats)
        assert float(log[f"moe_rankslots_r{rank}"]) == slots
        assert float(log[f"moe_rankslots_r{1 - rank}"]) == 0
        assert all(torch.is_tensor(v) for v in log.values())
        per_rank.append((log, slots))
    summed = {k: per_rank[0][0][k] + per_rank[1][0][k] for k in per_rank[0][0]}  # the all-reduce
    with metrics.aggregate() as agg:
        reduce_moe_metrics([summed], sample_size=1)
    slots = [s for _, s in per_rank]
    assert agg.get_smoothed_values()["moe_rank_imbalance"] == pytest.approx(
        round(max(slots) / (sum(slots) / 2), 3))
    assert 1.4 < max(slots) / (sum(slots) / 2) < 1.6
