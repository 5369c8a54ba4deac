"""``adaptive_moe_transformer_lm``: a decoder-only language model with adaptive-gating MoE FFNs.

Built from the plugin's public pieces alone: ``MoEConfig`` (the ``moe_*`` options), the
``AdaptiveMoETransformerDecoder`` (MoE decoder layers, stats collected in
``extra["moe_stats"]``) and the architecture helper that fills and checks the MoE options. It
trains with fairseq's ``language_modeling`` task and ``--criterion adaptive_moe_cross_entropy``.
"""

from dataclasses import dataclass

from fairseq.models import ARCH_CONFIG_REGISTRY, register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    DEFAULT_MAX_TARGET_POSITIONS,
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)
from fairseq.utils import safe_getattr

from .adaptive_moe_transformer import (
    AdaptiveMoETransformerConfig,
    AdaptiveMoETransformerDecoder,
    set_arch_defaults,
)
from .config import MoEConfig, check_and_configure_moe_args, set_moe_defaults


@dataclass
class AdaptiveMoETransformerLMConfig(TransformerLanguageModelConfig, MoEConfig):
    """fairseq's ``TransformerLanguageModelConfig`` plus the ``moe_*`` options."""


@register_model("adaptive_moe_transformer_lm", dataclass=AdaptiveMoETransformerLMConfig)
class AdaptiveMoETransformerLanguageModel(TransformerLanguageModel):
    @classmethod
    def build_model(cls, args, task):
        """Copied from fairseq 0.12.3.1 (fairseq-fixed),
        ``fairseq.models.transformer_lm.TransformerLanguageModel.build_model``; lines ending in
        ``# MoE:`` differ (pinned in :mod:`.upstream`)."""
        moe_lm_architecture(args)  # MoE: fills what the chosen architecture left unset, checks
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))

        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(
                args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS
            )

        # MoE: character embeddings and adaptive input are refused, not built
        for flag, on in (("--character-embeddings", args.character_embeddings),  # MoE:
                         ("--adaptive-input", args.adaptive_input)):  # MoE:
            if on:  # MoE:
                raise ValueError(f"adaptive_moe_transformer_lm does not support {flag}")  # MoE:
        embed_tokens = cls.build_embedding(  # MoE: (was the else branch)
            args, task.source_dictionary, args.decoder_input_dim  # MoE:
        )  # MoE:

        if args.tie_adaptive_weights:
            assert args.adaptive_input
            assert args.adaptive_input_factor == args.adaptive_softmax_factor
            assert (
                args.adaptive_softmax_cutoff == args.adaptive_input_cutoff
            ), "{} != {}".format(
                args.adaptive_softmax_cutoff, args.adaptive_input_cutoff
            )
            assert args.decoder_input_dim == args.decoder_output_dim

        decoder = AdaptiveMoETransformerDecoder(  # MoE:
            AdaptiveMoETransformerConfig.from_namespace(args),  # MoE:
            task.target_dictionary, embed_tokens, no_encoder_attn=True  # MoE:
        )
        return cls(decoder)


def moe_lm_architecture(args, **moe_defaults):
    """fairseq's LM defaults plus the MoE options (checked; a bad one exits with one line)."""
    set_moe_defaults(args, **moe_defaults)
    base_lm_architecture(args)
    check_and_configure_moe_args(args)


# register_model(name, dataclass=...) registered an architecture of the same name that does
# nothing; it gets the MoE defaults and start-up checks too (fairseq's transformer_lm defaults:
# 6 layers, d 512, FFN 2048; 16 experts).
ARCH_CONFIG_REGISTRY["adaptive_moe_transformer_lm"] = moe_lm_architecture


@register_model_architecture("adaptive_moe_transformer_lm", "adaptive_moe_transformer_lm_tiny")
def adaptive_moe_transformer_lm_tiny(args):
    """For tests and CPU runs: 2 layers, d 64, FFN 128, 4 heads, 4 experts."""
    set_arch_defaults(args, safe_getattr, decoder_embed_dim=64, decoder_ffn_embed_dim=128,
                      decoder_layers=2, decoder_attention_heads=4,
                      share_decoder_input_output_embed=True)
    moe_lm_architecture(args, moe_expert_count=4)


@register_model_architecture("adaptive_moe_transformer_lm", "adaptive_moe_transformer_lm_gpt2_medium")
def adaptive_moe_transformer_lm_gpt2_medium(args):
    """The paper's GPT-2 shape: 24 layers, d 1024, 16 heads, FFN 4096, GELU, 16 experts."""
    set_arch_defaults(args, safe_getattr, decoder_embed_dim=1024, decoder_ffn_embed_dim=4096,
                      decoder_layers=24, decoder_attention_heads=16, dropout=0.1,
                      attention_dropout=0.1, activation_fn="gelu")
    moe_lm_architecture(args, moe_expert_count=16)
