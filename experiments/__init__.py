"""The research harness: runners that train, time and compare gating schemes with fairseq.

Importable from a clone's root (``python -m experiments.compare ...``); not installed by pip, which
installs the plugin (``fairseq_adaptive_moe``) only. See ``experiments/README.md`` for each runner.
Runners start their child processes (``timed_train``, fairseq-generate) as ``python -m
experiments.<module>`` with the clone's root on ``PYTHONPATH``, so that they work from any directory.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the clone's root


def module_argv(module: str, *args) -> list:
    """``python -m experiments.<module> ARGS``: a child process running one of the runners."""
    return [sys.executable, "-m", f"experiments.{module}", *map(str, args)]


def child_env(threads=None, **extra) -> dict:
    """This process's environment for a child, with the clone's root first on ``PYTHONPATH`` (so
    ``-m experiments.*`` resolves) and, if given, ``threads`` as ``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS``."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", **extra)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env
