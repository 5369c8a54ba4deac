"""``adaptive_moe_transformer_lm``: a decoder-only language model with adaptive-gating MoE FFNs.

Built from the plugin's public pieces alone: ``MoEConfig`` (the ``moe_*`` options), the
``AdaptiveMoETransformerDecoder`` (MoE decoder layers, stats collected in
``extra["moe_stats"]``) and the architecture helper that fills and checks the MoE options. It
trains with fairseq's ``language_modeling`` task and ``--criterion adaptive_moe_cross_entropy``.
"""

from dataclasses import dataclass

from fairseq.models import ARCH_CONFIG_REGISTRY, register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)
from fairseq.utils import safe_getattr

from .adaptive_moe_transformer import AdaptiveMoETransformerConfig, AdaptiveMoETransformerDecoder
from .config import MoEConfig, exit_on_bad_moe_args, set_moe_defaults


@dataclass
class AdaptiveMoETransformerLMConfig(TransformerLanguageModelConfig, MoEConfig):
    """fairseq's ``TransformerLanguageModelConfig`` plus the ``moe_*`` options."""


@register_model("adaptive_moe_transformer_lm", dataclass=AdaptiveMoETransformerLMConfig)
class AdaptiveMoETransformerLanguageModel(TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        moe_lm_architecture(args)
        for flag, on in (("--character-embeddings", args.character_embeddings),
                         ("--adaptive-input", args.adaptive_input)):
            if on:
                raise ValueError(f"adaptive_moe_transformer_lm does not support {flag}")
        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(args, "tokens_per_sample", 1024)
        embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)
        cfg = AdaptiveMoETransformerConfig.from_namespace(args)
        return cls(AdaptiveMoETransformerDecoder(cfg, task.target_dictionary, embed_tokens,
                                                 no_encoder_attn=True))


def moe_lm_architecture(args, **moe_defaults):
    """fairseq's LM defaults plus the MoE options (checked; a bad one exits with one line)."""
    set_moe_defaults(args, **moe_defaults)
    base_lm_architecture(args)
    exit_on_bad_moe_args(args)


# register_model(name, dataclass=...) registered an architecture of the same name that does
# nothing; it gets the MoE defaults and start-up checks too (fairseq's transformer_lm defaults:
# 6 layers, d 512, FFN 2048; 16 experts).
ARCH_CONFIG_REGISTRY["adaptive_moe_transformer_lm"] = moe_lm_architecture


@register_model_architecture("adaptive_moe_transformer_lm", "adaptive_moe_transformer_lm_tiny")
def adaptive_moe_transformer_lm_tiny(args):
    """For tests and CPU runs: 2 layers, d 64, FFN 128, 4 heads, 4 experts."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 128)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    args.share_decoder_input_output_embed = safe_getattr(args, "share_decoder_input_output_embed", True)
    moe_lm_architecture(args, moe_expert_count=4)


@register_model_architecture("adaptive_moe_transformer_lm", "adaptive_moe_transformer_lm_gpt2_medium")
def adaptive_moe_transformer_lm_gpt2_medium(args):
    """The paper's GPT-2 shape: 24 layers, d 1024, 16 heads, FFN 4096, GELU, 16 experts."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 1024)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 4096)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 24)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 16)
    args.dropout = safe_getattr(args, "dropout", 0.1)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.1)
    args.activation_fn = safe_getattr(args, "activation_fn", "gelu")
    moe_lm_architecture(args, moe_expert_count=16)
