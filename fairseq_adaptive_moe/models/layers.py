"""fairseq transformer layers whose FFN sublayer is an MoE layer.

The FFN swap is written once (:class:`MoEFFNMixin`) and shared by the encoder and decoder
layers. Each layer's ``forward`` returns its usual outputs plus the layer's ``MoEStats``; the
encoder and decoder collect those into ``encoder_out["moe_stats"]`` / ``extra["moe_stats"]``.
"""

import sys
from typing import Dict, List, Optional

import torch
from torch import Tensor

from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)

from .. import expert_parallel
from ..moe import ExpertFFN, MoELayer, MoEStats, TopKGate
from .config import resolve_balance_tokens


def is_moe_layer(index: int, moe_freq: int) -> bool:
    """Layers N, 2N, ... (1-based) are MoE for ``--moe-freq N``; none for N = 0."""
    return moe_freq > 0 and (index + 1) % moe_freq == 0


def build_moe_layer(cfg, embed_dim: int, ffn_dim: int, name: str) -> MoELayer:
    """An :class:`MoELayer` from a config carrying the ``moe_*`` fields of ``MoEConfig`` and
    fairseq's ``activation_fn`` / ``activation_dropout`` (``relu_dropout``).

    With ``moe_expert_parallel_size`` P > 1 the layer holds only its rank's E/P experts (their
    global indices keep the initialisation of an unsharded layer) and exchanges tokens with the
    other ranks of its expert-parallel group; see :mod:`fairseq_adaptive_moe.expert_parallel`."""
    gate = TopKGate(
        embed_dim, cfg.moe_expert_count, policy=cfg.moe_gating, threshold=cfg.moe_threshold,
        max_experts=cfg.moe_max_experts, eval_policy=cfg.moe_eval_gating,
        capacity_factor=cfg.moe_capacity_factor, threshold_probs=cfg.moe_threshold_probs,
        combine_weights=cfg.moe_combine_weights,
    )
    activation_dropout = getattr(cfg, "activation_dropout", 0.0) or getattr(cfg, "relu_dropout", 0.0) or 0.0
    try:
        ep = expert_parallel.setup(expert_parallel.parallel_size(cfg))
    except expert_parallel.ExpertParallelError as e:  # e.g. a shard given to fairseq-generate
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(1) from None
    local = cfg.moe_expert_count if ep is None else cfg.moe_expert_count // ep.size
    experts = ExpertFFN(local, embed_dim, ffn_dim,
                        activation=str(getattr(cfg, "activation_fn", "relu")),
                        activation_dropout=activation_dropout,
                        first_expert=0 if ep is None else ep.rank * local)
    if ep is not None:
        expert_parallel.shard_parameters(experts, ep)
    return MoELayer(gate, experts, name=name, balance_tokens=resolve_balance_tokens(cfg),
                    group=None if ep is None else ep.group)


class MoEFFNMixin:
    """Replaces a fairseq transformer layer's fc1/fc2 by ``self.moe``.

    Subclasses call ``self.moe_ffn_sublayer`` where fairseq runs the FFN sublayer. The MoE layer
    needs the (B, T) padding mask so that padding takes no expert and no statistic.
    """

    def build_fc1(self, *args, **kwargs):  # fairseq's hooks: no dense FFN in an MoE layer
        return None

    def build_fc2(self, *args, **kwargs):
        return None

    def moe_ffn_sublayer(self, x: Tensor, padding_mask: Optional[Tensor]):
        """x: T x B x C, padding_mask: B x T (True = pad) -> (T x B x C, MoEStats)."""
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        x, stats = self.moe(x, None if padding_mask is None else padding_mask.transpose(0, 1))
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x, stats


class MoETransformerEncoderLayer(MoEFFNMixin, TransformerEncoderLayerBase):
    """fairseq's encoder layer with an MoE FFN. ``forward`` returns ``(x, MoEStats)``."""

    def __init__(self, cfg, name: str):
        super().__init__(cfg)
        self.moe = build_moe_layer(cfg, self.embed_dim, cfg.encoder.ffn_embed_dim, name)

    def forward(self, x, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        if attn_mask is not None:  # as fairseq: masked positions get a large negative score
            attn_mask = attn_mask.masked_fill(
                attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4
            )
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(query=x, key=x, value=x, key_padding_mask=encoder_padding_mask,
                              need_weights=False, attn_mask=attn_mask)
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)
        return self.moe_ffn_sublayer(x, encoder_padding_mask)


class MoETransformerDecoderLayer(MoEFFNMixin, TransformerDecoderLayerBase):
    """fairseq's decoder layer with an MoE FFN. ``forward`` returns ``(x, attn, None, MoEStats)``.

    NormFormer options (``--scale-attn``, ``--scale-heads``, ``--scale-fc``, ``--scale-resids``)
    and ``--cross-self-attention`` are not supported in MoE layers (checked at build time).
    """

    def __init__(self, cfg, name: str, no_encoder_attn=False):
        super().__init__(cfg, no_encoder_attn)
        unsupported = [flag for flag, on in (
            ("--cross-self-attention", self.cross_self_attention), ("--scale-attn", self.attn_ln is not None),
            ("--scale-heads", self.c_attn is not None), ("--scale-fc", self.ffn_layernorm is not None),
            ("--scale-resids", self.w_resid is not None)) if on]
        if unsupported:
            raise ValueError(f"MoE decoder layers do not support {', '.join(unsupported)}")
        self.moe = build_moe_layer(cfg, self.embed_dim, cfg.decoder.ffn_embed_dim, name)

    def forward(
        self,
        x,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        prev_self_attn_state: Optional[List[Tensor]] = None,
        prev_attn_state: Optional[List[Tensor]] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        if need_head_weights:
            need_attn = True
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        if prev_self_attn_state is not None:
            self.self_attn._set_input_buffer(incremental_state, _saved_state(prev_self_attn_state))
        x, attn = self.self_attn(query=x, key=x, value=x, key_padding_mask=self_attn_padding_mask,
                                 incremental_state=incremental_state, need_weights=False,
                                 attn_mask=self_attn_mask)
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        if self.encoder_attn is not None and encoder_out is not None:
            residual = x
            if self.normalize_before:
                x = self.encoder_attn_layer_norm(x)
            if prev_attn_state is not None:
                self.encoder_attn._set_input_buffer(incremental_state, _saved_state(prev_attn_state))
            x, attn = self.encoder_attn(
                query=x, key=encoder_out, value=encoder_out, key_padding_mask=encoder_padding_mask,
                incremental_state=incremental_state, static_kv=True,
                need_weights=need_attn or (not self.training and self.need_attn),
                need_head_weights=need_head_weights,
            )
            x = self.dropout_module(x)
            x = self.residual_connection(x, residual)
            if not self.normalize_before:
                x = self.encoder_attn_layer_norm(x)

        # incremental decoding feeds one position at a time: the mask's last column is it
        padding = self_attn_padding_mask
        if padding is not None and padding.size(1) != x.size(0):
            padding = padding[:, -x.size(0):]
        x, stats = self.moe_ffn_sublayer(x, padding)
        return x, attn, None, stats


def _saved_state(state: List[Tensor]) -> Dict[str, Optional[Tensor]]:
    saved: Dict[str, Optional[Tensor]] = {"prev_key": state[0], "prev_value": state[1]}
    if len(state) >= 3:
        saved["prev_key_padding_mask"] = state[2]
    return saved


def layer_stats(result) -> Optional[MoEStats]:
    """The MoEStats a layer's forward returned, or None for a dense layer."""
    last = result[-1] if isinstance(result, tuple) else None
    return last if isinstance(last, MoEStats) else None
