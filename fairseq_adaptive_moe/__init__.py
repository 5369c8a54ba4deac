"""fairseq_adaptive_moe: adaptive-gating mixture-of-experts for fairseq.

``fairseq-train --user-dir fairseq_adaptive_moe`` imports this package, which registers the
models and criterions with fairseq and makes fairseq's own checkpoints load under torch >= 2.6.
The plain-PyTorch MoE layer lives in :mod:`fairseq_adaptive_moe.moe` and needs no fairseq.
"""

from . import checkpoint_compat  # noqa: F401  (first: before fairseq loads any checkpoint)
from . import criterions, models  # noqa: F401  (registration)
from . import tasks  # noqa: F401  (registration: adaptive_moe_translation)

__version__ = "0.1.0"

from .cli.fairseq_help import register_if_help_requested as _register_help  # noqa: E402

_register_help()
