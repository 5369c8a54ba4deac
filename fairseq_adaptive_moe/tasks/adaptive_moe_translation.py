"""``adaptive_moe_translation``: fairseq's ``translation`` task plus the complexity curriculum
(``--moe-curriculum``, :mod:`.curriculum`). Also serves BART summarization fine-tuning, which
uses the translation task."""

from dataclasses import dataclass

from fairseq import utils
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .curriculum import CurriculumTaskMixin, MoECurriculumConfig
from ..errors import MoEConfigError


@dataclass
class AdaptiveMoETranslationConfig(TranslationConfig, MoECurriculumConfig):
    """fairseq's ``TranslationConfig`` plus the ``moe_curriculum*`` options."""


@register_task("adaptive_moe_translation", dataclass=AdaptiveMoETranslationConfig)
class AdaptiveMoETranslationTask(CurriculumTaskMixin, TranslationTask):
    """fairseq's translation task with ``--moe-curriculum``."""

    cfg: AdaptiveMoETranslationConfig
