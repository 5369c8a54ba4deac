"""The plugin's error types, and the one place that turns them into a one-line exit.

Library code raises; it never writes to stderr or exits. Every error a user can cause (a bad
flag, a checkpoint that does not fit the model, shards of different steps) is an
:class:`AdaptiveMoEError`, whose message is one line that names the flag or file.

Two kinds of boundary turn such an error into ``error: <message>`` on stderr and a non-zero exit:

* the console scripts of this package (``adaptive-moe-*``): their ``main`` catches the errors of
  its tool, prints ``PROG: error: ...`` and returns 2;
* fairseq's own ones (``fairseq-train``, ``fairseq-generate``, ...), whose ``main`` belongs to
  fairseq: :func:`install_excepthook` (called by
  :func:`fairseq_adaptive_moe.distributed.fairseq_patches.install`) wraps ``sys.excepthook`` so
  that an uncaught :class:`AdaptiveMoEError` prints its one line instead of a traceback; every
  other exception keeps the traceback. Python exits with status 1 after the hook, as for any
  uncaught exception. This covers one process, each ``torchrun`` worker (the worker's exception
  reaches its own hook), and fairseq's ``torch.multiprocessing`` spawn of one process per GPU,
  where the parent receives the child's traceback as text (``ProcessRaisedException``): its last
  line names our error type and holds the message.

This module imports neither torch nor fairseq, so the plain-PyTorch core (``moe/``) may use it.
"""

import sys

EXCEPTHOOK_MARK = "__adaptive_moe_boundary__"


class AdaptiveMoEError(ValueError):
    """An error of this plugin a user can fix; the message is one line naming what to change."""


class MoEConfigError(AdaptiveMoEError):
    """A bad MoE option. The message names the flag (or, from the plain-PyTorch layer, the
    constructor argument)."""


def _error_names() -> dict:
    """``module.Class`` -> class, for :class:`AdaptiveMoEError` and every subclass defined so far:
    how a traceback's last line names them."""
    names, todo = {}, [AdaptiveMoEError]
    while todo:
        cls = todo.pop()
        names[f"{cls.__module__}.{cls.__qualname__}"] = cls
        todo.extend(cls.__subclasses__())
    return names


def one_line(exc: BaseException):
    """The one-line message for an error of this plugin, or None for any other exception.

    Also finds our error inside fairseq's multi-GPU spawn: torch.multiprocessing re-raises a
    child's exception in the parent as ``ProcessRaisedException`` carrying the child's formatted
    traceback, whose last line is ``package.module.ErrorClass: message``.
    """
    if isinstance(exc, AdaptiveMoEError):
        return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) \
            or type(exc).__name__
    if type(exc).__name__ == "ProcessRaisedException":
        lines = [line for line in str(exc).splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        name, sep, message = last.partition(": ")
        if sep and name in _error_names():
            return message.strip()
    return None


def install_excepthook() -> None:
    """Wrap ``sys.excepthook`` once: an uncaught :class:`AdaptiveMoEError` prints
    ``error: <message>`` on stderr (Python then exits with status 1); anything else goes to the
    hook that was there before. Idempotent: a hook already wrapped (by this or another copy of the
    module) is left alone."""
    previous = sys.excepthook
    if getattr(previous, EXCEPTHOOK_MARK, False):
        return

    def excepthook(exc_type, exc, tb):
        message = one_line(exc) if exc is not None else None
        if message is None:
            return previous(exc_type, exc, tb)
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()

    setattr(excepthook, EXCEPTHOOK_MARK, True)
    excepthook.previous = previous
    sys.excepthook = excepthook
