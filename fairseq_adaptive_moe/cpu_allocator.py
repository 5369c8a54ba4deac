"""Keep freed memory inside the process during CPU training (glibc only).

glibc's malloc gives large freed blocks back to the operating system at once: blocks above its
mmap threshold are unmapped, and the top of the heap is trimmed. A training step allocates and
frees the same large activations and gradients every step, so on CPU each step page-faults them
back in: measured on the Multi30k demo data, a third of the CPU time went to the kernel, and
keeping the memory made 80 updates 1.39x faster with the same losses (docs/allocator.md).

:func:`configure` sets, through ``mallopt``, an mmap threshold and a trim threshold of 1 GiB and
a top pad of 256 MiB, so that freed blocks are reused by the next step instead. The plugin calls it
once when fairseq loads it (``--user-dir``) on a machine without CUDA. It does nothing:

- with ``ADAPTIVE_MOE_MALLOC=0`` in the environment (the opt-out);
- when the environment already sets glibc's own malloc variables (``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``, or ``glibc.malloc``
  tunables in ``GLIBC_TUNABLES``): the user's settings win;
- where the C library is not glibc (musl, macOS, Windows), or CUDA is available.

The cost is memory that stays mapped after a peak (the process's RSS no longer shrinks between
steps): measured in docs/allocator.md.
"""

import ctypes
import ctypes.util
import logging
import os
from typing import Mapping, Optional

logger = logging.getLogger(__name__)

OPT_OUT = "ADAPTIVE_MOE_MALLOC"
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_MAX_")
# mallopt's parameter numbers (malloc.h) and the values set
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 256 << 20))

#: what the last :func:`configure` call did ("kept" or why not), for logs and tests
state: Optional[str] = None


def _glibc():
    """The process's glibc, or None when the C library is another one."""
    try:
        libc = ctypes.CDLL(None)
        version = libc.gnu_get_libc_version  # glibc only
        version.restype = ctypes.c_char_p
        version()
        return libc
    except (OSError, AttributeError):
        return None


def configure(environ: Mapping[str, str] = os.environ, cuda: Optional[bool] = None) -> str:
    """Apply :data:`SETTINGS` where they help (see the module docstring); returns ``"kept"``
    when they were applied, else the reason they were not."""
    global state
    if environ.get(OPT_OUT, "").strip().lower() in ("0", "off", "false", "no"):
        state = f"off ({OPT_OUT}={environ[OPT_OUT]})"
    elif any(v in environ for v in USER_VARIABLES) or "glibc.malloc" in environ.get(
            "GLIBC_TUNABLES", ""):
        state = "off (malloc settings in the environment)"
    else:
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        libc = None if cuda else _glibc()
        if cuda:
            state = "off (CUDA is available)"
        elif libc is None:
            state = "off (the C library is not glibc)"
        elif all(libc.mallopt(ctypes.c_int(p), ctypes.c_int(v)) == 1 for p, v in SETTINGS):
            state = "kept"
        else:
            state = "off (mallopt refused a setting)"
    if state == "kept":
        logger.info("CPU allocator: freed memory is kept in the process (glibc mallopt; "
                    "%s=0 turns this off)", OPT_OUT)
    return state
