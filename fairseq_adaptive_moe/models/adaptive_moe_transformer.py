"""``adaptive_moe_transformer``: fairseq's encoder-decoder transformer with MoE FFNs.

Every ``--moe-freq``-th encoder and decoder layer gets an MoE FFN; ``--moe-freq 0`` is the
dense baseline in the same code path. The MoE statistics of one forward travel as a list of
``MoEStats`` in ``net_output[1]["moe_stats"]`` (encoder layers first), where the criterion reads
them.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModelBase,
)
from fairseq.models.transformer.transformer_legacy import base_architecture
from fairseq.modules.checkpoint_activations import checkpoint_wrapper

from ..moe import MoEStats
from .config import MoEConfig, check_and_configure_moe_args, set_moe_defaults
from .layers import (
    MoETransformerDecoderLayer,
    MoETransformerEncoderLayer,
    is_moe_layer,
    layer_stats,
)


@dataclass
class AdaptiveMoETransformerConfig(TransformerConfig, MoEConfig):
    """fairseq's ``TransformerConfig`` plus the ``moe_*`` options."""


def _wrap(layer, cfg):
    """fairseq's activation checkpointing / FSDP wrapping, as its own layer builders do."""
    if cfg.checkpoint_activations:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not cfg.checkpoint_activations else 0)


class _MoELayerChoice:
    """Which layers get an MoE FFN. Override ``is_moe_layer`` to choose any subset.

    fairseq builds its layers inside ``__init__`` without passing their index, so they are
    counted here as they are built.
    """

    def is_moe_layer(self, index: int, cfg) -> bool:
        """Layer ``index`` (0-based) is MoE; default: every ``--moe-freq``-th layer."""
        return is_moe_layer(index, cfg.moe_freq)

    def _next_layer_index(self) -> int:
        index = self.__dict__.get("_layers_built", 0)
        self.__dict__["_layers_built"] = index + 1
        return index


class AdaptiveMoETransformerEncoder(_MoELayerChoice, TransformerEncoderBase):
    def build_encoder_layer(self, cfg):
        index = self._next_layer_index()
        if not self.is_moe_layer(index, cfg):
            return super().build_encoder_layer(cfg)
        return _wrap(MoETransformerEncoderLayer(cfg, name=f"encoder.{index}"), cfg)

    def forward_scriptable(
        self,
        src_tokens,
        src_lengths: Optional[torch.Tensor] = None,
        return_all_hiddens: bool = False,
        token_embeddings: Optional[torch.Tensor] = None,
    ):
        """Copied from fairseq 0.12.3.1 (fairseq-fixed),
        ``fairseq.models.transformer.transformer_encoder.TransformerEncoderBase.forward_scriptable``;
        lines ending in ``# MoE:`` differ (pinned in :mod:`.upstream`). Collects each MoE layer's
        stats in ``encoder_out["moe_stats"]``."""
        # compute padding mask
        encoder_padding_mask = src_tokens.eq(self.padding_idx)
        has_pads = (
            torch.tensor(src_tokens.device.type == "xla") or encoder_padding_mask.any()
        )
        # Torchscript doesn't handle bool Tensor correctly, so we need to work around.
        if torch.jit.is_scripting():
            has_pads = torch.tensor(1) if has_pads else torch.tensor(0)

        x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings)

        # account for padding while computing the representation
        x = x * (
            1 - encoder_padding_mask.unsqueeze(-1).type_as(x) * has_pads.type_as(x)
        )

        # B x T x C -> T x B x C
        x = x.transpose(0, 1)

        encoder_states = []
        fc_results = []
        moe_stats: List[MoEStats] = []  # MoE:

        if return_all_hiddens:
            encoder_states.append(x)

        # encoder layers
        for layer in self.layers:
            lr = layer(
                x, encoder_padding_mask=encoder_padding_mask if has_pads else None
            )

            stats = layer_stats(lr)  # MoE: an MoE layer returns (x, MoEStats)
            if stats is not None:  # MoE:
                moe_stats.append(stats)  # MoE:
                lr = lr[0]  # MoE:
            if isinstance(lr, tuple) and len(lr) == 2:
                x, fc_result = lr
            else:
                x = lr
                fc_result = None

            if return_all_hiddens and not torch.jit.is_scripting():
                assert encoder_states is not None
                encoder_states.append(x)
                fc_results.append(fc_result)

        if self.layer_norm is not None:
            x = self.layer_norm(x)

        # The Pytorch Mobile lite interpreter does not supports returning NamedTuple in
        # `forward` so we use a dictionary instead.
        # TorchScript does not support mixed values so the values are all lists.
        # The empty list is equivalent to None.
        src_lengths = (
            src_tokens.ne(self.padding_idx)
            .sum(dim=1, dtype=torch.int32)
            .reshape(-1, 1)
            .contiguous()
        )
        return {
            "encoder_out": [x],  # T x B x C
            "encoder_padding_mask": [encoder_padding_mask],  # B x T
            "encoder_embedding": [encoder_embedding],  # B x T x C
            "encoder_states": encoder_states,  # List[T x B x C]
            "fc_results": fc_results,  # List[T x B x C]
            "src_tokens": [],
            "src_lengths": [src_lengths],
            "moe_stats": moe_stats,  # MoE: List[MoEStats]; dropped by reorder_encoder_out
        }


class AdaptiveMoETransformerDecoder(_MoELayerChoice, TransformerDecoderBase):
    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        index = self._next_layer_index()
        if not self.is_moe_layer(index, cfg):
            return super().build_decoder_layer(cfg, no_encoder_attn)
        return _wrap(MoETransformerDecoderLayer(cfg, f"decoder.{index}", no_encoder_attn), cfg)

    def extract_features_scriptable(
        self,
        prev_output_tokens,
        encoder_out: Optional[Dict[str, List[Tensor]]],
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        full_context_alignment: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        """Copied from fairseq 0.12.3.1 (fairseq-fixed),
        ``fairseq.models.transformer.transformer_decoder.TransformerDecoderBase.extract_features_scriptable``;
        lines ending in ``# MoE:`` differ (pinned in :mod:`.upstream`). Collects each MoE layer's
        stats in ``extra["moe_stats"]``."""
        bs, slen = prev_output_tokens.size()
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1

        enc: Optional[Tensor] = None
        padding_mask: Optional[Tensor] = None
        if encoder_out is not None and len(encoder_out["encoder_out"]) > 0:
            enc = encoder_out["encoder_out"][0]
        if encoder_out is not None and len(encoder_out["encoder_padding_mask"]) > 0:
            padding_mask = encoder_out["encoder_padding_mask"][0]

        # embed positions
        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(
                prev_output_tokens, incremental_state=incremental_state
            )

        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]

        # Prevent torchscript exporting issue for dynamic quant embedding
        prev_output_tokens = prev_output_tokens.contiguous()
        # embed tokens and positions
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)

        if self.quant_noise is not None:
            x = self.quant_noise(x)

        if self.project_in_dim is not None:
            x = self.project_in_dim(x)

        if positions is not None:
            x += positions

        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)

        x = self.dropout_module(x)

        # B x T x C -> T x B x C
        x = x.transpose(0, 1)

        self_attn_padding_mask: Optional[Tensor] = None
        if self.cross_self_attention or prev_output_tokens.eq(self.padding_idx).any():
            self_attn_padding_mask = prev_output_tokens.eq(self.padding_idx)

        # decoder layers
        attn: Optional[Tensor] = None
        inner_states: List[Optional[Tensor]] = [x]
        moe_stats: List[MoEStats] = []  # MoE:
        for idx, layer in enumerate(self.layers):
            if incremental_state is None and not full_context_alignment:
                self_attn_mask = self.buffered_future_mask(x)
            else:
                self_attn_mask = None

            result = layer(  # MoE: an MoE layer returns (x, attn, state, MoEStats)
                x,
                enc,
                padding_mask,
                incremental_state,
                self_attn_mask=self_attn_mask,
                self_attn_padding_mask=self_attn_padding_mask,
                need_attn=bool((idx == alignment_layer)),
                need_head_weights=bool((idx == alignment_layer)),
            )
            x, layer_attn = result[0], result[1]  # MoE:
            stats = layer_stats(result)  # MoE:
            if stats is not None:  # MoE:
                moe_stats.append(stats)  # MoE:
            inner_states.append(x)
            if layer_attn is not None and idx == alignment_layer:
                attn = layer_attn.float().to(x)

        if attn is not None:
            if alignment_heads is not None:
                attn = attn[:alignment_heads]

            # average probabilities over heads
            attn = attn.mean(dim=0)

        if self.layer_norm is not None:
            x = self.layer_norm(x)

        # T x B x C -> B x T x C
        x = x.transpose(0, 1)

        if self.project_out_dim is not None:
            x = self.project_out_dim(x)

        return x, {"attn": [attn], "inner_states": inner_states, "moe_stats": moe_stats}  # MoE:


@register_model("adaptive_moe_transformer")
class AdaptiveMoETransformerModel(TransformerModelBase):
    """Encoder-decoder transformer whose FFNs are adaptive-gating MoE layers."""

    def __init__(self, cfg, encoder, decoder):
        cfg = AdaptiveMoETransformerConfig.from_namespace(cfg)
        super().__init__(cfg, encoder, decoder)
        self.args = cfg

    @classmethod
    def add_args(cls, parser):
        # defaults are left to the architectures, as fairseq's legacy transformer does
        gen_parser_from_dataclass(parser, AdaptiveMoETransformerConfig(), delete_default=True,
                                  with_prefix="")

    @classmethod
    def build_model(cls, args, task):
        adaptive_moe_transformer(args)  # fills what the chosen architecture left unset, checks
        return super().build_model(AdaptiveMoETransformerConfig.from_namespace(args), task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return AdaptiveMoETransformerEncoder(cfg, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        return AdaptiveMoETransformerDecoder(cfg, tgt_dict, embed_tokens,
                                             no_encoder_attn=cfg.no_cross_attention)

    def forward(
        self,
        src_tokens,
        src_lengths,
        prev_output_tokens,
        return_all_hiddens: bool = True,
        features_only: bool = False,
        alignment_layer: Optional[int] = None,
        alignment_heads: Optional[int] = None,
    ):
        """Copied from fairseq 0.12.3.1 (fairseq-fixed),
        ``fairseq.models.transformer.transformer_base.TransformerModelBase.forward``; lines ending
        in ``# MoE:`` differ (pinned in :mod:`.upstream`)."""
        # MoE: the encoder and decoder calls are encode_decode's, shared with MoE BART
        return encode_decode(  # MoE:
            self, src_tokens, src_lengths, prev_output_tokens, return_all_hiddens,  # MoE:
            features_only=features_only,
            alignment_layer=alignment_layer,
            alignment_heads=alignment_heads,
        )  # MoE: src_lengths, return_all_hiddens passed above; encode_decode returns decoder_out


def encode_decode(model, src_tokens, src_lengths, prev_output_tokens, return_all_hiddens: bool,
                  token_embeddings: Optional[Tensor] = None, **decoder_kwargs):
    """Encoder, then decoder, with every MoE layer's stats in ``extra["moe_stats"]`` (encoder
    layers first). Shared by the encoder-decoder models of this plugin.

    The encoder and decoder calls of fairseq 0.12.3.1's ``TransformerModelBase.forward`` and
    ``BARTModel.forward`` (both pinned in :mod:`.upstream`), plus the ``moe_stats`` line."""
    encoder_out = model.encoder(src_tokens, src_lengths=src_lengths, token_embeddings=token_embeddings,
                                return_all_hiddens=return_all_hiddens)
    x, extra = model.decoder(prev_output_tokens, encoder_out=encoder_out, src_lengths=src_lengths,
                             return_all_hiddens=return_all_hiddens, **decoder_kwargs)
    extra["moe_stats"] = encoder_out.get("moe_stats", []) + extra.get("moe_stats", [])
    return x, extra


def set_arch_defaults(args, get=getattr, **defaults) -> None:
    """``args.name = get(args, name, default)`` for each ``name=default``: what fairseq's
    architecture functions write one line per option. ``get`` is ``getattr`` (as fairseq's
    legacy transformer architectures) or ``fairseq.utils.safe_getattr`` (as its transformer_lm
    ones), so that each architecture keeps the semantics of the fairseq one it extends."""
    for name, default in defaults.items():
        setattr(args, name, get(args, name, default))


@register_model_architecture("adaptive_moe_transformer", "adaptive_moe_transformer")
def adaptive_moe_transformer(args, **moe_defaults):
    """fairseq's transformer base dimensions (6+6 layers, d 512, FFN 2048), 16 experts."""
    set_moe_defaults(args, **moe_defaults)
    base_architecture(args)
    check_and_configure_moe_args(args)


@register_model_architecture("adaptive_moe_transformer", "adaptive_moe_transformer_tiny")
def adaptive_moe_transformer_tiny(args):
    """For tests and CPU demos: 2+2 layers, d 64, FFN 128, 4 heads, 4 experts."""
    set_arch_defaults(args, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_layers=2,
                      encoder_attention_heads=4, decoder_layers=2, decoder_attention_heads=4)
    adaptive_moe_transformer(args, moe_expert_count=4)


@register_model_architecture("adaptive_moe_transformer", "adaptive_moe_transformer_small")
def adaptive_moe_transformer_small(args):
    """Quick GPU runs and longer CPU runs: 3+3 layers, d 512, FFN 2048, 8 heads, 8 experts."""
    set_arch_defaults(args, encoder_layers=3, decoder_layers=3)
    adaptive_moe_transformer(args, moe_expert_count=8)


@register_model_architecture("adaptive_moe_transformer", "adaptive_moe_transformer_wmt19_de_en")
def adaptive_moe_transformer_wmt19_de_en(args):
    """FSMT WMT19 de-en shape: 6+6 layers, d 1024, encoder FFN 8192, decoder FFN 4096, 16 heads,
    16 experts."""
    set_arch_defaults(args, encoder_embed_dim=1024, encoder_ffn_embed_dim=8192,
                      encoder_attention_heads=16, decoder_embed_dim=1024,
                      decoder_ffn_embed_dim=4096, decoder_attention_heads=16, dropout=0.2,
                      share_all_embeddings=True)
    adaptive_moe_transformer(args, moe_expert_count=16)
