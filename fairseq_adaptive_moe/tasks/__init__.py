"""fairseq tasks of this plugin."""

from .adaptive_moe_language_modeling import (  # noqa: F401  (registers the task)
    AdaptiveMoELanguageModelingConfig,
    AdaptiveMoELanguageModelingTask,
)
from .adaptive_moe_translation import (  # noqa: F401  (registers the task)
    AdaptiveMoETranslationConfig,
    AdaptiveMoETranslationTask,
)
from .curriculum import CurriculumTaskMixin, MoECurriculumConfig  # noqa: F401
