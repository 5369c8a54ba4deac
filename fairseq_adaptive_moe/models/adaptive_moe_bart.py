"""``adaptive_moe_bart``: fairseq's BART with adaptive-gating MoE FFNs.

The model subclasses fairseq's ``BARTModel``, so BART fine-tuning keeps working as it is:
``--restore-file`` of a BART checkpoint, classification heads, ``--init-token``, the removal of
the ``<mask>`` embedding row when fine-tuning on a task without it, and ``BARTHubInterface``.
Its encoder and decoder are this plugin's ``AdaptiveMoETransformerEncoder/Decoder``: every
``--moe-freq``-th layer has an MoE FFN, and the layers' ``MoEStats`` reach the criterion in
``net_output[1]["moe_stats"]`` (encoder layers first).

**Dense checkpoints load into it.** ``fairseq-train --arch adaptive_moe_bart_large
--restore-file bart.large/model.pt --reset-optimizer ...``: ``upgrade_state_dict_named``, which
fairseq runs on every state dict before loading it, turns the dense FFN weights of each layer that
is MoE here (``encoder.layers.3.fc1.weight`` ...) into that layer's expert stacks
(:func:`.dense_to_moe.dense_ffn_to_experts`, the conversion ``adaptive-moe-upcycle`` uses too):

- ``--moe-init-from-dense copy`` (default): every expert is a copy of the dense FFN
  (``ExpertFFN.load_dense``);
- ``--moe-init-from-dense random``: the experts keep their random init and the dense FFN is
  dropped.

The gate, which a dense checkpoint does not have, keeps the model's own init: ``nn.Linear``'s
default ``U(-1/sqrt(d), 1/sqrt(d))``, the same as in ``adaptive_moe_transformer`` and the upcycle
tool (BART's BERT-style re-initialisation of every linear layer is undone for the gates). With
copied experts and ``--moe-combine-weights renormalized`` the model computes exactly what the
dense BART computed, whatever the routing; with ``softmax`` weights (the default) each token's FFN
output is scaled by the probabilities of the experts it used, and a warning says so. A checkpoint
that is already MoE loads unchanged; a mismatch (expert count, FFN size, an MoE layer where this
model is dense) stops with one line naming the layer.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.bart import BARTModel
from fairseq.models.bart.model import bart_base_architecture, bart_large_architecture

from .adaptive_moe_transformer import AdaptiveMoETransformerModel, encode_decode
from .config import MoEConfig, check_and_configure_moe_args, set_moe_defaults
from .dense_to_moe import (  # noqa: F401  (MoECheckpointError: importable from here, as before)
    INIT_FROM_DENSE, MoECheckpointError, dense_ffn_to_experts, moe_layers,
)

logger = logging.getLogger(__name__)


@dataclass
class MoEBARTConfig(FairseqDataclass):
    moe_init_from_dense: ChoiceEnum(INIT_FROM_DENSE) = field(
        default="copy",
        metadata={"help": "when a dense checkpoint is loaded (--restore-file of a BART model): "
                          "copy each dense FFN into every expert of its layer, or keep the "
                          "experts' random init and drop the dense FFN (default: copy)"},
    )


@register_model("adaptive_moe_bart")
class AdaptiveMoEBARTModel(BARTModel):
    """BART whose FFNs are adaptive-gating MoE layers (see the module docstring)."""

    def __init__(self, args, encoder, decoder):
        super().__init__(args, encoder, decoder)
        # BARTModel re-initialised every nn.Linear as BERT does; the gates get back nn.Linear's
        # default init, as everywhere else in this plugin. The experts were not touched.
        for _, moe in moe_layers(self):
            moe.gate.wg.reset_parameters()

    @staticmethod
    def add_args(parser):
        BARTModel.add_args(parser)
        gen_parser_from_dataclass(parser, MoEConfig(), delete_default=True)
        gen_parser_from_dataclass(parser, MoEBARTConfig(), delete_default=True)

    @classmethod
    def build_model(cls, args, task):
        adaptive_moe_bart(args)  # fills what the chosen architecture left unset, checks
        return super().build_model(args, task)

    # the MoE encoder and decoder of adaptive_moe_transformer
    build_encoder = classmethod(AdaptiveMoETransformerModel.build_encoder.__func__)
    build_decoder = classmethod(AdaptiveMoETransformerModel.build_decoder.__func__)

    def forward(self, src_tokens, src_lengths, prev_output_tokens, features_only: bool = False,
                classification_head_name: Optional[str] = None,
                token_embeddings: Optional[torch.Tensor] = None, return_all_hiddens: bool = True,
                alignment_layer: Optional[int] = None, alignment_heads: Optional[int] = None):
        """BARTModel.forward, plus the encoder's MoE stats in ``extra["moe_stats"]``."""
        if classification_head_name is not None:
            features_only = True
        x, extra = encode_decode(self, src_tokens, src_lengths, prev_output_tokens,
                                 return_all_hiddens, token_embeddings=token_embeddings,
                                 features_only=features_only, alignment_layer=alignment_layer,
                                 alignment_heads=alignment_heads)
        if classification_head_name is not None:  # the last </s> of each sentence, as BART
            sentence = x[src_tokens.eq(self.eos), :].view(x.size(0), -1, x.size(-1))[:, -1, :]
            x = self.classification_heads[classification_head_name](sentence)
        return x, extra

    def upgrade_state_dict_named(self, state_dict, name):
        """BART's upgrades (heads, ``<mask>`` row, layer norms), then dense FFN -> experts."""
        super().upgrade_state_dict_named(state_dict, name)
        init = getattr(self.args, "moe_init_from_dense", None) or "copy"
        try:
            converted = dense_ffn_to_experts(self, state_dict, name + "." if name else "", init)
        except MoECheckpointError as e:  # one line at fairseq's boundary (fairseq_adaptive_moe.errors)
            raise MoECheckpointError(f"cannot load the checkpoint into {self.args.arch}: {e}") from None
        if not converted:
            return
        experts = moe_layers(self)[0][1].experts.num_experts
        logger.info(f"dense checkpoint: the FFNs of {len(converted)} layers became {experts} "
                    f"experts each ({'copies of the dense FFN' if init == 'copy' else 'random init'}"
                    f"; gates at their init): {', '.join(converted)}")
        if init == "copy" and (getattr(self.args, "moe_combine_weights", "softmax") != "renormalized"
                               or (getattr(self.args, "moe_capacity_factor", 0) or 0) > 0):
            logger.warning(
                "experts copied from a dense FFN, but with --moe-combine-weights "
                f"{self.args.moe_combine_weights} and --moe-capacity-factor "
                f"{self.args.moe_capacity_factor:g} the model does not start from the dense "
                "model's outputs: softmax weights scale each token's FFN output by the gate "
                "probabilities it used (p1, or p1 + p2), and a capacity limit drops tokens; "
                "--moe-combine-weights renormalized with no capacity limit reproduces them exactly")


def _moe_bart_defaults(args, dims, **moe_defaults) -> None:
    """Architecture dims first, then BART-large's for the rest, the MoE defaults, the checks."""
    set_moe_defaults(args, **moe_defaults)
    if getattr(args, "moe_init_from_dense", None) is None:
        args.moe_init_from_dense = "copy"
    dims(args)
    check_and_configure_moe_args(args)


@register_model_architecture("adaptive_moe_bart", "adaptive_moe_bart")
def adaptive_moe_bart(args):
    """BART-large dimensions (12+12 layers, d 1024, FFN 4096, 16 heads, GELU), 16 experts."""
    _moe_bart_defaults(args, bart_large_architecture, moe_expert_count=16)


@register_model_architecture("adaptive_moe_bart", "adaptive_moe_bart_large")
def adaptive_moe_bart_large(args):
    """BART-large: 12+12 layers, d 1024, FFN 4096, 16 heads, 16 experts."""
    _moe_bart_defaults(args, bart_large_architecture, moe_expert_count=16)


@register_model_architecture("adaptive_moe_bart", "adaptive_moe_bart_base")
def adaptive_moe_bart_base(args):
    """BART-base: 6+6 layers, d 768, FFN 3072, 12 heads, 16 experts."""
    _moe_bart_defaults(args, bart_base_architecture, moe_expert_count=16)


@register_model_architecture("adaptive_moe_bart", "adaptive_moe_bart_tiny")
def adaptive_moe_bart_tiny(args):
    """For tests and CPU runs: 2+2 layers, d 128, FFN 512, 4 heads, 4 experts, BART otherwise
    (learned positions up to 1024, layernorm on embeddings, GELU, shared embeddings)."""
    for name, value in (("encoder_embed_dim", 128), ("encoder_ffn_embed_dim", 512),
                        ("encoder_layers", 2), ("encoder_attention_heads", 4),
                        ("decoder_layers", 2), ("decoder_attention_heads", 4)):
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    _moe_bart_defaults(args, bart_large_architecture, moe_expert_count=4)
