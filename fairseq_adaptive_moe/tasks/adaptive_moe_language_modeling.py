"""``adaptive_moe_language_modeling``: fairseq's ``language_modeling`` task plus the complexity
curriculum (``--moe-curriculum``, :mod:`.curriculum`), for decoder-only MoE language models
(``--arch adaptive_moe_transformer_lm*``, ``--criterion adaptive_moe_cross_entropy``). A sample
is one of fairseq's blocks (``--sample-break-mode``, ``--tokens-per-sample``)."""

from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from .curriculum import CurriculumTaskMixin, MoECurriculumConfig


@dataclass
class AdaptiveMoELanguageModelingConfig(LanguageModelingConfig, MoECurriculumConfig):
    """fairseq's ``LanguageModelingConfig`` plus the ``moe_curriculum*`` options."""


@register_task("adaptive_moe_language_modeling", dataclass=AdaptiveMoELanguageModelingConfig)
class AdaptiveMoELanguageModelingTask(CurriculumTaskMixin, LanguageModelingTask):
    """fairseq's language-modeling task with ``--moe-curriculum``."""

    cfg: AdaptiveMoELanguageModelingConfig
