"""fairseq criterions of this plugin."""

from .adaptive_moe_cross_entropy import (  # noqa: F401  (registers the criterion)
    AdaptiveMoELabelSmoothedCrossEntropyConfig,
    AdaptiveMoELabelSmoothedCrossEntropyCriterion,
    MoECriterionMixin,
    MoELossConfig,
)
from .adaptive_moe_lm_cross_entropy import (  # noqa: F401  (registers the criterion)
    AdaptiveMoECrossEntropyConfig,
    AdaptiveMoECrossEntropyCriterion,
)
from .moe_logging import moe_auxiliary_loss, moe_logging_output, reduce_moe_metrics  # noqa: F401
