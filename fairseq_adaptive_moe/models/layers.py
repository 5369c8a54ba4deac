"""fairseq transformer layers whose FFN sublayer is an MoE layer.

The FFN swap is written once (:class:`MoEFFNMixin`) and shared by the encoder and decoder
layers. Each layer's ``forward`` returns its usual outputs plus the layer's ``MoEStats``; the
encoder and decoder collect those into ``encoder_out["moe_stats"]`` / ``extra["moe_stats"]``.
"""

from typing import Dict, List, Optional

import torch
from torch import Tensor

from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)

from .. import distributed
from ..moe import ExpertFFN, MoELayer, MoEStats, TopKGate
from .config import budget_config, resolve_balance_tokens, resolve_combine_weights


def is_moe_layer(index: int, moe_freq: int) -> bool:
    """Layers N, 2N, ... (1-based) are MoE for ``--moe-freq N``; none for N = 0."""
    return moe_freq > 0 and (index + 1) % moe_freq == 0


def build_moe_layer(cfg, embed_dim: int, ffn_dim: int, name: str) -> MoELayer:
    """An :class:`MoELayer` from a config carrying the ``moe_*`` fields of ``MoEConfig`` and
    fairseq's ``activation_fn`` / ``activation_dropout`` (``relu_dropout``).

    With ``moe_expert_parallel_size`` P > 1 the layer holds only its rank's E/P experts (their
    global indices keep the initialisation of an unsharded layer) and exchanges tokens with the
    other ranks of its expert-parallel group; see :mod:`fairseq_adaptive_moe.distributed`. Its
    expert parameters then carry the expert-parallel state that the fairseq patches read.

    Raises :class:`~fairseq_adaptive_moe.errors.MoEConfigError` for options the layer cannot use
    (e.g. a shard of a P > 1 model loaded in one process)."""
    gate = TopKGate(
        embed_dim, cfg.moe_expert_count, policy=cfg.moe_gating, threshold=cfg.moe_threshold,
        max_experts=cfg.moe_max_experts, eval_policy=cfg.moe_eval_gating,
        capacity_factor=cfg.moe_capacity_factor, threshold_probs=cfg.moe_threshold_probs,
        combine_weights=resolve_combine_weights(cfg), budget=budget_config(cfg),
    )  # a budget's T is shared by every rank (the default group), expert-parallel or not
    activation_dropout = getattr(cfg, "activation_dropout", 0.0) or getattr(cfg, "relu_dropout", 0.0) or 0.0
    ep = distributed.setup(distributed.parallel_size(cfg))  # e.g. a shard given to fairseq-generate raises
    if ep is not None:
        distributed.install()  # the fairseq patches it needs (a no-op once the plugin registered)
    local = cfg.moe_expert_count if ep is None else cfg.moe_expert_count // ep.size
    experts = ExpertFFN(local, embed_dim, ffn_dim,
                        activation=str(getattr(cfg, "activation_fn", "relu")),
                        activation_dropout=activation_dropout,
                        first_expert=0 if ep is None else ep.rank * local)
    if ep is not None:
        distributed.shard_parameters(experts, ep)
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
        """x: T x B x C, padding_mask: B x T (True = pad) -> (T x B x C, MoEStats).

        The FFN sublayer of fairseq 0.12.3.1's ``TransformerEncoderLayerBase.forward`` and
        ``TransformerDecoderLayerBase.forward`` (pinned in :mod:`.upstream`), with fc1/fc2 replaced
        by the MoE layer (the lines marked ``# MoE:``)."""
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        mask = None if padding_mask is None else padding_mask.transpose(0, 1)  # MoE: T x B
        x, stats = self.moe(x, mask)  # MoE: fc1, activation, fc2 -> the MoE layer
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x, stats  # MoE:


class MoETransformerEncoderLayer(MoEFFNMixin, TransformerEncoderLayerBase):
    """fairseq's encoder layer with an MoE FFN. ``forward`` returns ``(x, MoEStats)``."""

    def __init__(self, cfg, name: str):
        super().__init__(cfg)
        self.moe = build_moe_layer(cfg, self.embed_dim, cfg.encoder.ffn_embed_dim, name)

    def forward(
        self,
        x,
        encoder_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor] = None,
    ):
        """Copied from fairseq 0.12.3.1 (fairseq-fixed),
        ``fairseq.modules.transformer_layer.TransformerEncoderLayerBase.forward``; lines ending in
        ``# MoE:`` differ (pinned in :mod:`.upstream`). Returns ``(x, MoEStats)``."""
        # anything in original attn_mask = 1, becomes -1e8
        # anything in original attn_mask = 0, becomes 0
        # Note that we cannot use -inf here, because at some edge cases,
        # the attention weight (before softmax) for some padded element in query
        # will become -inf, which results in NaN in model parameters
        if attn_mask is not None:
            attn_mask = attn_mask.masked_fill(
                attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4
            )

        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(
            query=x,
            key=x,
            value=x,
            key_padding_mask=encoder_padding_mask,
            need_weights=False,
            attn_mask=attn_mask,
        )
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        # MoE: fairseq's FFN sublayer (fc1, fc2, --return-fc) is the MoE layer here
        return self.moe_ffn_sublayer(x, encoder_padding_mask)  # MoE:


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
        encoder_out: Optional[torch.Tensor] = None,
        encoder_padding_mask: Optional[torch.Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        prev_self_attn_state: Optional[List[torch.Tensor]] = None,
        prev_attn_state: Optional[List[torch.Tensor]] = None,
        self_attn_mask: Optional[torch.Tensor] = None,
        self_attn_padding_mask: Optional[torch.Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        """Copied from fairseq 0.12.3.1 (fairseq-fixed),
        ``fairseq.modules.transformer_layer.TransformerDecoderLayerBase.forward``; lines ending in
        ``# MoE:`` differ (pinned in :mod:`.upstream`). Returns ``(x, attn, self_attn_state,
        MoEStats)``."""
        if need_head_weights:
            need_attn = True

        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        if prev_self_attn_state is not None:
            saved_state = _saved_state(prev_self_attn_state)  # MoE: one helper for both states
            assert incremental_state is not None
            self.self_attn._set_input_buffer(incremental_state, saved_state)
        # MoE: the --cross-self-attention block is removed (refused in __init__)
        y = x  # MoE:

        x, attn = self.self_attn(
            query=x,
            key=y,
            value=y,
            key_padding_mask=self_attn_padding_mask,
            incremental_state=incremental_state,
            need_weights=False,
            attn_mask=self_attn_mask,
        )
        # MoE: the --scale-heads and --scale-attn lines are removed (refused in __init__)
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        if self.encoder_attn is not None and encoder_out is not None:
            residual = x
            if self.normalize_before:
                x = self.encoder_attn_layer_norm(x)
            if prev_attn_state is not None:
                saved_state = _saved_state(prev_attn_state)  # MoE: one helper for both states
                assert incremental_state is not None
                self.encoder_attn._set_input_buffer(incremental_state, saved_state)

            x, attn = self.encoder_attn(
                query=x,
                key=encoder_out,
                value=encoder_out,
                key_padding_mask=encoder_padding_mask,
                incremental_state=incremental_state,
                static_kv=True,
                need_weights=need_attn or (not self.training and self.need_attn),
                need_head_weights=need_head_weights,
            )
            x = self.dropout_module(x)
            x = self.residual_connection(x, residual)
            if not self.normalize_before:
                x = self.encoder_attn_layer_norm(x)

        # MoE: fairseq's FFN sublayer (fc1, fc2, --scale-fc, --scale-resids) is the MoE layer here
        # MoE: incremental decoding feeds one position at a time: the mask's last column is it
        padding = self_attn_padding_mask  # MoE:
        if padding is not None and padding.size(1) != x.size(0):  # MoE:
            padding = padding[:, -x.size(0):]  # MoE:
        x, stats = self.moe_ffn_sublayer(x, padding)  # MoE:
        if self.onnx_trace and incremental_state is not None:
            saved_state = self.self_attn._get_input_buffer(incremental_state)
            assert saved_state is not None
            if self_attn_padding_mask is not None:
                self_attn_state = [
                    saved_state["prev_key"],
                    saved_state["prev_value"],
                    saved_state["prev_key_padding_mask"],
                ]
            else:
                self_attn_state = [saved_state["prev_key"], saved_state["prev_value"]]
            return x, attn, self_attn_state, stats  # MoE:
        return x, attn, None, stats  # MoE:


def _saved_state(state: List[Tensor]) -> Dict[str, Optional[Tensor]]:
    """The attention input buffer of ``prev_self_attn_state`` / ``prev_attn_state``, built as
    fairseq's decoder layer does for each (one helper for both)."""
    saved: Dict[str, Optional[Tensor]] = {"prev_key": state[0], "prev_value": state[1]}
    if len(state) >= 3:
        saved["prev_key_padding_mask"] = state[2]
    return saved


def layer_stats(result) -> Optional[MoEStats]:
    """The MoEStats a layer's forward returned, or None for a dense layer."""
    last = result[-1] if isinstance(result, tuple) else None
    return last if isinstance(last, MoEStats) else None
