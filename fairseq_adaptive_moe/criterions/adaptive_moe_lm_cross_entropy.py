"""``adaptive_moe_cross_entropy``: fairseq's cross-entropy plus the MoE auxiliary losses.

For language models (``language_modeling`` task). The auxiliary loss and the metrics come from
:class:`MoECriterionMixin`, shared with the label-smoothed seq2seq criterion, and so is validation:
``loss`` under the training gating, ``loss_top1`` beside it (perplexity ``ppl_top1``).
"""

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig

from .adaptive_moe_cross_entropy import MoECriterionMixin, MoELossConfig
from .moe_logging import reduce_moe_metrics, reduce_top1_metrics


@dataclass
class AdaptiveMoECrossEntropyConfig(CrossEntropyCriterionConfig, MoELossConfig):
    pass


@register_criterion("adaptive_moe_cross_entropy", dataclass=AdaptiveMoECrossEntropyConfig)
class AdaptiveMoECrossEntropyCriterion(MoECriterionMixin, CrossEntropyCriterion):
    def __init__(self, task, sentence_avg, moe_balance_loss_weight=0.01, moe_z_loss_weight=0.0,
                 no_moe_valid_top1=False):
        super().__init__(task, sentence_avg)
        self.moe_balance_loss_weight = moe_balance_loss_weight
        self.moe_z_loss_weight = moe_z_loss_weight
        self.no_moe_valid_top1 = no_moe_valid_top1

    def task_loss(self, model, net_output, sample, reduce):
        loss, _ = self.compute_loss(model, net_output, sample, reduce=reduce)
        return loss, {"loss": loss.data}  # the task loss: fairseq derives perplexity from it

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        CrossEntropyCriterion.reduce_metrics(logging_outputs)
        reduce_moe_metrics(logging_outputs, sum(log.get("sample_size", 0) for log in logging_outputs))
        reduce_top1_metrics(logging_outputs)
