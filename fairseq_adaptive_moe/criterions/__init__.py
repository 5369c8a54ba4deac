"""fairseq criterions of this plugin."""

from .adaptive_moe_cross_entropy import (  # noqa: F401  (registers the criterion)
    AdaptiveMoELabelSmoothedCrossEntropyConfig,
    AdaptiveMoELabelSmoothedCrossEntropyCriterion,
    MoECriterionMixin,
    MoELossConfig,
)
from .moe_logging import moe_auxiliary_loss, moe_logging_output, reduce_moe_metrics  # noqa: F401
