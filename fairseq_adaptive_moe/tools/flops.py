"""Forward FLOPs of an encoder-decoder MoE transformer: the whole model and its MoE layers.

One sentence pair, ``S`` source and ``T`` target tokens, teacher-forced through the encoder and
the decoder once. Counting rules:

* A multiply-add is 2 FLOPs: ``x @ W`` with ``W`` of shape ``(a, b)`` costs ``2 a b`` per row.
* Only matmuls are counted. Embedding lookups (tokens, positions) are 0 FLOPs: a lookup does no
  arithmetic, so "embeddings included" and "excluded" give the same count here. Layer norms,
  softmaxes, activations, dropout and residual adds (a few FLOPs per element) are left out.
* Biases are left out (one add per output element).

Per layer, with model dim ``d`` (``d_e`` / ``d_d`` for the encoder / decoder), FFN dim ``f``,
``E`` experts and ``k`` experts used per token in an MoE layer:

=========================================  =====================================  ============
part                                       FLOPs                                  per
=========================================  =====================================  ============
encoder self-attention: q, k, v, o          ``4 * 2 d_e^2``                        source token
encoder self-attention: scores, values      ``2 * 2 S d_e`` (all S positions)      source token
decoder self-attention: q, k, v, o          ``4 * 2 d_d^2``                        target token
decoder self-attention: scores, values      ``2 * 2 ((T + 1) / 2) d_d`` (causal)   target token
encoder attention: q, o                     ``2 * 2 d_d^2``                        target token
encoder attention: k, v (of encoder out)    ``2 * 2 d_e d_d``                      source token
encoder attention: scores, values           ``2 * 2 S d_d``                        target token
dense FFN                                   ``2 * 2 d f``                          token
MoE FFN                                     ``k * 2 * 2 d f + 2 d E`` (gate)       token
output projection                           ``2 d_d V``                            target token
=========================================  =====================================  ============

Causal halving: target position ``t`` attends to ``t`` positions, ``(T + 1) / 2`` on average,
which is the work incremental decoding does. (fairseq's teacher-forced training multiplies the
full ``T x T`` score matrix and masks half of it, so training spends the unhalved amount there.)
The encoder attention's k and v projections run once per source token and decoder layer, not
once per target token.

``k`` is 1 for top-1, 2 for top-2, and ``1 + s`` for adaptive gating with at most two experts,
where ``s`` is the layer's measured share of two-expert tokens. The "MoE-layer FLOPs" are the FFN
sublayers only (the experts and the gate, or the dense FFN of the dense model): their ratio
between two schemes is what the routing changes; the whole-model ratio is what a step computes.

Pure Python; imports nothing from torch or fairseq.
"""

from dataclasses import dataclass, field, fields
from typing import Dict, Mapping, Optional, Union

__all__ = ["Shape", "FlopsCount", "forward_flops", "scheme_experts", "is_moe_layer",
           "FSMT_WMT19_DE_EN", "FSMT_WMT19_SENTENCE_LENGTH"]


@dataclass(frozen=True)
class Shape:
    """What the count needs of a model. ``moe_freq`` as ``--moe-freq`` (0: dense, no MoE layer);
    ``vocab``: rows of the output projection (the target dictionary)."""

    encoder_layers: int
    decoder_layers: int
    encoder_embed_dim: int
    decoder_embed_dim: int
    encoder_ffn_embed_dim: int
    decoder_ffn_embed_dim: int
    moe_expert_count: int
    moe_freq: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: Mapping, **override) -> "Shape":
        """From a mapping with these keys (e.g. ``experiments.compare``'s model record); keys
        missing there must be given in ``override``."""
        values = {f.name: override[f.name] if f.name in override else cfg.get(f.name)
                  for f in fields(cls)}
        missing = [k for k, v in values.items() if v is None]
        if missing:
            raise ValueError(f"model shape lacks {', '.join(missing)}")
        return cls(**{k: int(v) for k, v in values.items()})

    def dense(self) -> "Shape":
        """The same model without MoE layers."""
        return Shape(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "moe_freq": 0})


#: The FSMT WMT19 de-en model (Ng et al. 2019, as released, e.g. ``facebook/wmt19-de-en``):
#: 6 + 6 layers, d 1024, FFN 8192 (encoder) / 4096 (decoder), a joined dictionary of 42,024
#: entries; with the paper's 16 experts in every layer (``adaptive_moe_transformer_wmt19_de_en``).
FSMT_WMT19_DE_EN = Shape(encoder_layers=6, decoder_layers=6, encoder_embed_dim=1024,
                         decoder_embed_dim=1024, encoder_ffn_embed_dim=8192,
                         decoder_ffn_embed_dim=4096, moe_expert_count=16, moe_freq=1,
                         vocab=42024)
#: The sentence length the docs use at that shape: 30 source and 30 target tokens.
FSMT_WMT19_SENTENCE_LENGTH = 30


def is_moe_layer(index: int, moe_freq: int) -> bool:
    """Layers N, 2N, ... (1-based) are MoE for ``--moe-freq N`` (as ``models.layers``)."""
    return moe_freq > 0 and (index + 1) % moe_freq == 0


@dataclass
class FlopsCount:
    """Forward FLOPs of one sentence pair, by part; ``per_token`` divides by ``S + T``."""

    src_len: float
    tgt_len: float
    encoder_attention: float = 0.0
    encoder_ffn: float = 0.0
    decoder_self_attention: float = 0.0
    decoder_encoder_attention: float = 0.0
    decoder_ffn: float = 0.0
    output_projection: float = 0.0
    embeddings: float = 0.0  # lookups: 0 FLOPs
    #: per layer (``enc0``, ``dec0``, ...): FLOPs per token of its side, with the encoder
    #: attention's k/v projections charged to the decoder layer per target token
    per_layer: Dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return (self.encoder_attention + self.encoder_ffn + self.decoder_self_attention
                + self.decoder_encoder_attention + self.decoder_ffn + self.output_projection
                + self.embeddings)

    @property
    def ffn(self) -> float:
        """The FFN sublayers: experts and gates (MoE layers) or the dense FFNs."""
        return self.encoder_ffn + self.decoder_ffn

    @property
    def tokens(self) -> float:
        return self.src_len + self.tgt_len

    @property
    def per_token(self) -> float:
        return self.total / self.tokens

    @property
    def ffn_per_token(self) -> float:
        return self.ffn / self.tokens

    def as_dict(self) -> dict:
        parts = ("encoder_attention", "encoder_ffn", "decoder_self_attention",
                 "decoder_encoder_attention", "decoder_ffn", "output_projection", "embeddings")
        return {"src_len": self.src_len, "tgt_len": self.tgt_len,
                "per_sentence": {p: getattr(self, p) for p in parts},
                "total": self.total, "per_token": self.per_token, "ffn": self.ffn,
                "ffn_per_token": self.ffn_per_token}


ExpertsPerToken = Union[float, Mapping[str, float]]


def forward_flops(shape: Shape, src_len: float, tgt_len: float,
                  experts_per_token: ExpertsPerToken = 1.0) -> FlopsCount:
    """Forward FLOPs of one sentence pair of ``src_len`` source and ``tgt_len`` target tokens.

    ``experts_per_token``: expert FFNs per token in each MoE layer (``1 + s`` from a measured
    two-expert share ``s``); one number for every layer, or a mapping ``enc<i>`` / ``dec<i>`` ->
    number with an entry for each MoE layer. Ignored for dense layers. Raises ``ValueError`` on
    a non-positive length or a missing layer.
    """
    if not src_len > 0 or not tgt_len > 0:
        raise ValueError(f"sentence lengths must be > 0, got {src_len} and {tgt_len}")
    S, T = float(src_len), float(tgt_len)
    count = FlopsCount(src_len=S, tgt_len=T)
    E, de, dd = shape.moe_expert_count, shape.encoder_embed_dim, shape.decoder_embed_dim

    def ffn(name, d, f, index):
        if not is_moe_layer(index, shape.moe_freq):
            return 2 * 2 * d * f
        if isinstance(experts_per_token, Mapping):
            if name not in experts_per_token:
                raise ValueError(f"no experts-per-token value for MoE layer {name}")
            k = float(experts_per_token[name])
        else:
            k = float(experts_per_token)
        return k * 2 * 2 * d * f + 2 * d * E

    for i in range(shape.encoder_layers):
        attn = 4 * 2 * de * de + 2 * 2 * S * de
        mlp = ffn(f"enc{i}", de, shape.encoder_ffn_embed_dim, i)
        count.encoder_attention += S * attn
        count.encoder_ffn += S * mlp
        count.per_layer[f"enc{i}"] = attn + mlp
    context = (T + 1) / 2  # causal: position t attends to t positions
    for i in range(shape.decoder_layers):
        self_attn = 4 * 2 * dd * dd + 2 * 2 * context * dd
        enc_attn_q_o = 2 * 2 * dd * dd + 2 * 2 * S * dd  # per target token
        enc_attn_k_v = 2 * 2 * de * dd  # per source token
        mlp = ffn(f"dec{i}", dd, shape.decoder_ffn_embed_dim, i)
        count.decoder_self_attention += T * self_attn
        count.decoder_encoder_attention += T * enc_attn_q_o + S * enc_attn_k_v
        count.decoder_ffn += T * mlp
        count.per_layer[f"dec{i}"] = self_attn + enc_attn_q_o + S * enc_attn_k_v / T + mlp
    count.output_projection = T * 2 * dd * shape.vocab
    return count


def scheme_experts(scheme: str, share: Optional[float] = None) -> float:
    """Experts per token for a scheme name: top1 1, top2 2, adaptive ``1 + share``."""
    if scheme in ("top1", "dense"):
        return 1.0
    if scheme == "top2":
        return 2.0
    if scheme == "adaptive":
        if share is None or not 0 <= share <= 1:
            raise ValueError(f"adaptive needs a two-expert share in [0, 1], got {share}")
        return 1.0 + share
    raise ValueError(f"unknown scheme {scheme!r}")
