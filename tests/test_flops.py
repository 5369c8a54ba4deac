"""fairseq_adaptive_moe.tools.flops: the whole-model forward FLOPs count against a count by hand."""

import pytest

from fairseq_adaptive_moe.tools.flops import (FSMT_WMT19_DE_EN, FSMT_WMT19_SENTENCE_LENGTH, Shape,
                                              forward_flops, scheme_experts)

# 2 + 2 layers, d 4, encoder FFN 8, decoder FFN 6, 3 experts, vocabulary 10, --moe-freq 2 (so
# enc1 and dec1 are MoE, enc0 and dec0 dense); one sentence pair of S = 3 source and T = 2
# target tokens; enc1 uses 1.25 experts per token (25% two-expert tokens), dec1 1.5.
SMALL = Shape(encoder_layers=2, decoder_layers=2, encoder_embed_dim=4, decoder_embed_dim=4,
              encoder_ffn_embed_dim=8, decoder_ffn_embed_dim=6, moe_expert_count=3, moe_freq=2,
              vocab=10)
EXPERTS = {"enc0": 99.0, "enc1": 1.25, "dec0": 99.0, "dec1": 1.5}  # dense layers ignore theirs


def test_small_shape_by_hand():
    c = forward_flops(SMALL, 3, 2, EXPERTS)
    # a multiply-add is 2 FLOPs; x @ W with W (a, b) is 2ab per row
    attn_proj = 2 * 4 * 4                         # one d x d projection: 32
    # encoder, per source token
    enc_self = 4 * attn_proj + 2 * (2 * 3 * 4)    # q, k, v, o + scores and values over S = 3: 176
    enc0_ffn = 2 * (2 * 4 * 8)                    # fc1 + fc2: 128
    gate = 2 * 4 * 3                              # d x E: 24
    enc1_ffn = 1.25 * enc0_ffn + gate             # 160 + 24 = 184
    assert (enc_self, enc0_ffn, enc1_ffn) == (176, 128, 184)
    assert c.encoder_attention == 3 * 2 * enc_self            # 1056
    assert c.encoder_ffn == 3 * (enc0_ffn + enc1_ffn)         # 936
    # decoder, per target token; causal: positions 1 and 2 attend to 1 and 2, mean 1.5
    dec_self = 4 * attn_proj + 2 * (2 * 1.5 * 4)  # 128 + 24 = 152
    enc_attn_q_o = 2 * attn_proj + 2 * (2 * 3 * 4)  # q, o + scores and values over S: 112
    enc_attn_k_v = 2 * attn_proj                  # per SOURCE token and decoder layer: 64
    dec0_ffn = 2 * (2 * 4 * 6)                    # 96
    dec1_ffn = 1.5 * dec0_ffn + gate              # 144 + 24 = 168
    out_proj = 2 * 4 * 10                         # d x V per target token: 80
    assert c.decoder_self_attention == 2 * 2 * dec_self                   # 608
    assert c.decoder_encoder_attention == 2 * 2 * enc_attn_q_o + 3 * 2 * enc_attn_k_v  # 448 + 384
    assert c.decoder_ffn == 2 * (dec0_ffn + dec1_ffn)                     # 528
    assert c.output_projection == 2 * out_proj                            # 160
    assert c.embeddings == 0                                              # lookups
    # 1992 (encoder) + 2128 (decoder) = 4120 for the pair, over its 5 tokens
    assert c.total == 1056 + 936 + 608 + 832 + 528 + 160 == 4120
    assert c.per_token == pytest.approx(4120 / 5)
    assert c.ffn == 936 + 528 == 1464
    assert c.ffn_per_token == pytest.approx(1464 / 5)
    # per layer: FLOPs per token of its side; the k/v projections spread over the target tokens
    assert c.per_layer == {"enc0": 176 + 128, "enc1": 176 + 184,
                           "dec0": 152 + 112 + 3 * 64 / 2 + 96,
                           "dec1": 152 + 112 + 3 * 64 / 2 + 168}
    assert c.as_dict()["per_sentence"]["output_projection"] == 160


def test_schemes_and_dense():
    top1, top2 = forward_flops(SMALL, 3, 2, 1.0), forward_flops(SMALL, 3, 2, 2.0)
    dense = forward_flops(SMALL.dense(), 3, 2)
    # top-1 is the dense model plus the gates: 24 per token in enc1 (x 3) and dec1 (x 2)
    assert top1.total - dense.total == 24 * 3 + 24 * 2
    # top-2 adds one more expert FFN per token in each MoE layer: 128 x 3 + 96 x 2
    assert top2.total - top1.total == 128 * 3 + 96 * 2
    assert top2.total - dense.total == top2.ffn - dense.ffn
    assert scheme_experts("top2") == 2 and scheme_experts("adaptive", 0.25) == 1.25
    with pytest.raises(ValueError):
        scheme_experts("adaptive")


def test_causal_halving_and_source_length():
    one = forward_flops(SMALL.dense(), 3, 1)
    # T = 1: the one target position attends to itself only
    assert one.decoder_self_attention == 2 * (4 * 32 + 2 * 2 * 1 * 4)
    # the k/v projections scale with S, not with T
    kv = lambda c: c.decoder_encoder_attention - c.tgt_len * 2 * (2 * 32 + 2 * 2 * c.src_len * 4)
    assert kv(forward_flops(SMALL.dense(), 3, 7)) == kv(forward_flops(SMALL.dense(), 3, 1)) \
        == 3 * 2 * 64


def test_bad_input():
    with pytest.raises(ValueError, match="dec1"):
        forward_flops(SMALL, 3, 2, {"enc1": 1.0})
    with pytest.raises(ValueError, match="lengths"):
        forward_flops(SMALL, 0, 2)
    with pytest.raises(ValueError, match="vocab"):
        Shape.from_config({"encoder_layers": 1})


def test_fsmt_wmt19_shape():
    """The figure docs/computation.md quotes beside the paper's 15.9G / 10.6G = 1.50."""
    L = FSMT_WMT19_SENTENCE_LENGTH
    dense = forward_flops(FSMT_WMT19_DE_EN.dense(), L, L)
    top2 = forward_flops(FSMT_WMT19_DE_EN, L, L, 2.0)
    adaptive = forward_flops(FSMT_WMT19_DE_EN, L, L, 1.256)  # the text's 25.6% two-expert tokens
    assert dense.per_token == pytest.approx(270.45e6, rel=1e-4)
    assert top2.total / dense.total == pytest.approx(1.559, abs=5e-4)
    assert top2.ffn / dense.ffn == pytest.approx(2.0, abs=2e-3)
    assert adaptive.total / top2.total == pytest.approx(0.734, abs=5e-4)
    assert adaptive.ffn / top2.ffn == pytest.approx(0.628, abs=5e-4)
