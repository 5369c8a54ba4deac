"""fairseq_adaptive_moe: adaptive-gating mixture-of-experts for fairseq.

``fairseq-train --user-dir fairseq_adaptive_moe`` imports this package, which registers the
models, criterions and tasks with fairseq, makes fairseq's own checkpoints load under
torch >= 2.6, restores the NumPy aliases fairseq 0.12 still reads under NumPy 2 and, on a CPU
machine with glibc, keeps freed memory in the process (``cpu_allocator``). The plain-PyTorch MoE
layer lives in :mod:`fairseq_adaptive_moe.moe` and needs no
fairseq: where fairseq cannot be imported, this package registers nothing, so that
``import fairseq_adaptive_moe.moe`` works with torch alone.
"""

from . import checkpoint_compat  # noqa: F401  (first: before fairseq loads any checkpoint)

__version__ = "0.1.0"

try:
    import fairseq  # noqa: F401
except ImportError:  # not installed (or blocked): the core alone, nothing to register
    fairseq = None

if fairseq is not None:
    # registration: an ImportError from here on is a real error, not a missing fairseq
    from . import numpy_compat  # noqa: F401,E402  (np.compat / np.int for fairseq's datasets)
    from .cpu_allocator import configure as _configure_cpu_allocator  # noqa: E402

    # on CPU: freed activations stay in the process instead of being faulted in every step
    # (glibc only; ADAPTIVE_MOE_MALLOC=0 opts out; docs/allocator.md)
    _configure_cpu_allocator()
    from . import criterions, models, optim, tasks  # noqa: F401,E402
    from .cli.fairseq_help import register_if_help_requested as _register_help  # noqa: E402
    from .distributed import install as _install_fairseq_patches  # noqa: E402

    # before fairseq builds a trainer: every patch of fairseq internals (the table in
    # distributed/fairseq_patches.py) and the one-line boundary for this plugin's errors
    _install_fairseq_patches()
    _register_help()

del fairseq
