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
