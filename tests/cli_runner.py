"""Run a console command of this venv (fairseq-train, adaptive-moe-routing, ...) the way a shell
does, minus the interpreter start-up.

Every command starts by importing torch and fairseq (several seconds of CPU); the tests start
dozens of them. A fork server that imported them once forks a child per command instead: the
child changes to the caller's directory and environment, points file descriptors 0, 1 and 2 at
files, sets ``sys.argv`` and calls the command's console entry point, and exits with the status
Python itself would give: the entry point's return value or ``SystemExit`` code, or, for an
uncaught exception, 1 after ``sys.excepthook`` (the plugin's one-line error boundary included).

``ADAPTIVE_MOE_TEST_SUBPROCESS=1`` runs every command as a real process instead.
"""

import importlib
import io
import logging
import multiprocessing
import os
import subprocess
import sys
import tempfile
import warnings
from importlib.metadata import entry_points
from typing import Optional

#: imported once by the fork server, so that no child pays for them
PRELOAD = ["torch", "fairseq", "fairseq_cli.train", "fairseq_cli.generate",
           "fairseq_cli.interactive", "fairseq_cli.eval_lm", "fairseq_adaptive_moe"]
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _entry_point(tool: str):
    found = [ep for ep in entry_points(group="console_scripts") if ep.name == tool]
    if not found:
        raise ValueError(f"no console script {tool!r} in this environment")
    return found[0]


def _child(tool, argv, cwd, env, stdin_path, out_path, err_path):
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path, flags in ((0, stdin_path, os.O_RDONLY), (1, out_path, os.O_WRONLY),
                            (2, err_path, os.O_WRONLY)):
        handle = os.open(path, flags)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    if env.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = [tool, *argv]
    # a fresh interpreter has no logging set up until the command's module configures it at
    # import (fairseq_cli.* call logging.basicConfig at module level): drop what the server's
    # imports left and run the command's module again
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    ep = _entry_point(tool)
    module = importlib.import_module(ep.module)
    if ep.module.startswith("fairseq_cli."):
        module = importlib.reload(module)
    code = 0
    try:
        result = getattr(module, ep.attr)()
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            sys.stderr.write(f"{e.code}\n")
    except BaseException:  # noqa: BLE001  (what the interpreter does with an uncaught error)
        sys.excepthook(*sys.exc_info())
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(tool: str, args, cwd=None, env=None, timeout: float = 600,
        input: Optional[str] = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run([tool, *args], capture_output=True, text=True, ...)``, forked; with
    ``fresh``, a real new process (for what happens at interpreter start or exit: the plugin's
    import under ``--help``, the installed script files)."""
    env = dict(os.environ if env is None else env)
    cwd = str(cwd) if cwd is not None else os.getcwd()
    if fresh or os.environ.get("ADAPTIVE_MOE_TEST_SUBPROCESS") == "1":
        bin_dir = os.path.dirname(sys.executable)
        return subprocess.run([os.path.join(bin_dir, tool), *args], cwd=cwd, env=env, text=True,
                              capture_output=True, timeout=timeout, input=input)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")]
        for path, text in zip(paths, (input or "", "", "")):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        proc = _context().Process(target=_child, args=(tool, list(args), cwd, env, *paths))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([tool, *args], timeout)
        with open(paths[1], encoding="utf-8", errors="replace") as f:
            out = f.read()
        with open(paths[2], encoding="utf-8", errors="replace") as f:
            err = f.read()
    return subprocess.CompletedProcess([tool, *args], proc.exitcode, out, err)
