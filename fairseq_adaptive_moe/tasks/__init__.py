"""fairseq tasks of this plugin."""

from .adaptive_moe_translation import (  # noqa: F401  (registers the task)
    AdaptiveMoETranslationConfig,
    AdaptiveMoETranslationTask,
)
