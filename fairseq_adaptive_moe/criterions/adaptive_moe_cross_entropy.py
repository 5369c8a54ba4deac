"""``adaptive_moe_label_smoothed_cross_entropy``: label-smoothed CE plus the MoE auxiliary losses.

``loss = CE + sample_size * (w_balance * sum_l L_balance,l + w_z * sum_l L_z,l)``, where CE is
the summed label-smoothed cross-entropy. The logged ``loss`` is CE alone; ``moe_loss`` is logged
beside it.

fairseq divides the summed CE by ``sample_size`` before the update, so the auxiliary terms act
with exactly their stated weights (paper: w_balance = 0.01), whatever the batch size.

Validation (a forward with the model in eval mode: fairseq-train's validation, fairseq-validate)
computes ``loss`` under the training gating, whatever ``--moe-eval-gating`` says, so that
``checkpoint_best``, ``--patience`` and the LR schedule follow what the model is trained for. A
second forward under top-1 gating, the paper's evaluation, logs ``loss_top1`` (``nll_loss_top1``,
``ppl_top1``) beside it; ``--no-moe-valid-top1`` turns it off, and it is skipped for top-1 and
dense models, whose two losses are the same.
"""

from dataclasses import dataclass, field

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import FairseqDataclass

from ..data.curriculum import SAMPLE_COMPLEXITY_KEY, sample_complexity
from ..models.config import check_loss_weights
from ..moe import eval_gating
from .moe_logging import (TOP1_KEYS, moe_auxiliary_loss, moe_logging_output, reduce_moe_metrics,
                          reduce_top1_metrics)


@dataclass
class MoELossConfig(FairseqDataclass):
    moe_balance_loss_weight: float = field(
        default=0.01,
        metadata={"help": "weight of the load-balancing loss E * sum_e f1_e * p_e, summed over "
                          "MoE layers (paper Eq. 4) (default: 0.01)"},
    )
    moe_z_loss_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the router z-loss, summed over MoE layers (default: 0)"},
    )
    no_moe_valid_top1: bool = field(
        default=False,
        metadata={"help": "validation: do not log the top-1 loss (loss_top1, nll_loss_top1, "
                          "ppl_top1) beside valid_loss, which is always under --moe-gating; by "
                          "default one extra forward of the validation batches under top-1 "
                          "gating logs it (skipped for top-1 and dense models)"},
    )

    def __post_init__(self):  # the one MoE option check (models/config.py), for yaml configs too
        check_loss_weights(self)


@dataclass
class AdaptiveMoELabelSmoothedCrossEntropyConfig(LabelSmoothedCrossEntropyCriterionConfig, MoELossConfig):
    pass


class MoECriterionMixin:
    """Adds the MoE auxiliary loss and metrics to a fairseq criterion.

    The criterion supplies ``task_loss(model, net_output, sample, reduce) -> (loss, logging
    entries)`` and keeps ``moe_balance_loss_weight`` / ``moe_z_loss_weight``; the mixin's
    ``forward`` adds ``sample_size * aux`` to the loss and the MoE metrics to the logging output.
    ``loss`` in the logging output stays the task loss alone (``moe_loss`` is logged beside it).

    In eval mode (validation) the loss is the one under the training gating, and, unless
    ``no_moe_valid_top1``, the task loss under top-1 gating is added as ``loss_top1`` (and
    ``nll_loss_top1``): see the module docstring. Both stay device tensors until reduce time.
    """

    no_moe_valid_top1 = False  # a criterion built without the option logs the top-1 loss

    def moe_loss(self, net_output, sample_size):
        """(scaled auxiliary loss to add to the summed task loss, logging entries)."""
        stats = net_output[1].get("moe_stats", []) if isinstance(net_output[1], dict) else []
        aux = moe_auxiliary_loss(stats, self.moe_balance_loss_weight, self.moe_z_loss_weight)
        aux = aux.to(net_output[0].device) * sample_size
        log = moe_logging_output(stats)
        if stats:
            log["moe_loss"] = aux.detach()  # read at reduce time (reduce_moe_metrics)
        return aux, log

    def forward(self, model, sample, reduce=True):
        if model.training:
            return self.moe_forward(model, sample, reduce)
        with eval_gating(model, "train") as gates:  # valid_loss: the training gating
            loss, sample_size, logging_output = self.moe_forward(model, sample, reduce)
        if not self.no_moe_valid_top1 and any(g.policy != "top1" for g in gates):
            with eval_gating(model, "top1"):
                net_output = model(**sample["net_input"])
                _, top1_log = self.task_loss(model, net_output, sample, reduce)
            logging_output.update({f"{k}_top1": top1_log[k] for k in TOP1_KEYS if k in top1_log})
        return loss, sample_size, logging_output

    def moe_forward(self, model, sample, reduce=True):
        """One forward under the gates' current gating: (loss + aux, sample_size, logging)."""
        net_output = model(**sample["net_input"])
        loss, logging_output = self.task_loss(model, net_output, sample, reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        aux, moe_log = self.moe_loss(net_output, sample_size)
        logging_output.update(ntokens=sample["ntokens"], nsentences=sample["target"].size(0),
                              sample_size=sample_size, **moe_log)
        # curriculum (tasks/adaptive_moe_translation.py): per-sample complexity, popped by the
        # task's train_step before fairseq's logging all-reduce
        if model.training and getattr(self.task, "collects_sample_complexity", False):
            logging_output[SAMPLE_COMPLEXITY_KEY] = sample_complexity(net_output, sample)
        return loss + aux, sample_size, logging_output


@register_criterion("adaptive_moe_label_smoothed_cross_entropy",
                    dataclass=AdaptiveMoELabelSmoothedCrossEntropyConfig)
class AdaptiveMoELabelSmoothedCrossEntropyCriterion(MoECriterionMixin, LabelSmoothedCrossEntropyCriterion):
    def __init__(self, task, sentence_avg, label_smoothing, ignore_prefix_size=0,
                 report_accuracy=False, moe_balance_loss_weight=0.01, moe_z_loss_weight=0.0,
                 no_moe_valid_top1=False):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.moe_balance_loss_weight = moe_balance_loss_weight
        self.moe_z_loss_weight = moe_z_loss_weight
        self.no_moe_valid_top1 = no_moe_valid_top1

    def task_loss(self, model, net_output, sample, reduce):
        loss, nll_loss = self.compute_loss(model, net_output, sample, reduce=reduce)
        logging_output = {"loss": loss.data, "nll_loss": nll_loss.data}
        if self.report_accuracy:
            n_correct, total = self.compute_accuracy(model, net_output, sample)
            logging_output["n_correct"] = n_correct.data
            logging_output["total"] = total.data
        return loss, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        reduce_moe_metrics(logging_outputs, sum(log.get("sample_size", 0) for log in logging_outputs))
        reduce_top1_metrics(logging_outputs)
