"""Run a console command of this venv (fairseq-train, adaptive-moe-routing, ...) as a shell would,
without paying the interpreter's start-up each time.

Every command starts by importing torch and fairseq (about 5 s of CPU, a third of it scikit-learn,
which fairseq's task registry imports); the tests run dozens. Each test process therefore starts
one fork server (``cli_server.py``, its own process: not multiprocessing's shared one) that has
imported them, and each command is a child forked from it with the caller's arguments, directory,
environment and standard streams, giving the exit status Python would.

A real new process is used instead where start-up is what the test is about or the server's
imports would differ from the command's: ``fresh=True``, ``--help``/``-h`` (the plugin registers
its help at import), a ``--user-dir`` other than this checkout's plugin, a tool that is not a
console script of this venv (torchrun: its workers are new processes anyway), and everything when
``ADAPTIVE_MOE_TEST_SUBPROCESS=1``.
"""

import atexit
import json
import os
import select
import time
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

SERVER = Path(__file__).with_name("cli_server.py")
PLUGIN = (Path(__file__).resolve().parents[1] / "fairseq_adaptive_moe").resolve()
FORKED_TOOLS = ("fairseq-", "adaptive-moe-")

_server: Optional[subprocess.Popen] = None
_pending = b""  # what the server has answered past the last full line


def _start_server() -> subprocess.Popen:
    global _server, _pending
    if _server is not None and _server.poll() is None:
        return _server
    _pending = b""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    _server = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
                               env=env, cwd=str(SERVER.parent))
    try:
        ready = _read(_server, 300)
    except RuntimeError:
        ready = None
    if not ready or "ready" not in ready:
        _server.kill()
        _server = None
        raise RuntimeError("the tests' fork server did not start (run with "
                           "ADAPTIVE_MOE_TEST_SUBPROCESS=1 to see the commands' own errors)")
    atexit.register(_stop_server)
    return _server


def _stop_server() -> None:
    global _server
    if _server is not None:
        try:
            _server.stdin.close()
            _server.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            _server.kill()
        _server = None


def _forkable(tool: str, args: Sequence[str], fresh: bool) -> bool:
    if fresh or os.environ.get("ADAPTIVE_MOE_TEST_SUBPROCESS") == "1":
        return False
    if not tool.startswith(FORKED_TOOLS) or "--help" in args or "-h" in args:
        return False
    for i, arg in enumerate(args[:-1]):
        if arg == "--user-dir" and Path(args[i + 1]).resolve() != PLUGIN:
            return False
    return True


def _read(server: subprocess.Popen, timeout: float):
    """The server's next answer, or None after ``timeout`` seconds without one."""
    global _pending
    deadline = time.monotonic() + timeout
    fd = server.stdout.fileno()
    while b"\n" not in _pending:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            raise RuntimeError("the tests' fork server ended unexpectedly")
        _pending += chunk
    line, _pending = _pending.split(b"\n", 1)
    return json.loads(line)


def run(tool: str, args: Sequence[str], cwd=None, env=None, timeout: float = 600,
        input: Optional[str] = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run([bin/tool, *args], capture_output=True, text=True, ...)``, forked from the
    server where that gives the same result (see the module's docstring)."""
    args = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    cwd = str(cwd) if cwd is not None else os.getcwd()
    path = str(Path(sys.executable).parent / tool)
    if not _forkable(tool, args, fresh):
        return subprocess.run([path, *args], cwd=cwd, env=env, text=True, capture_output=True,
                              timeout=timeout, input=input)
    server = _start_server()
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: os.path.join(tmp, name) for name in ("stdin", "stdout", "stderr")}
        for name, text in zip(files, (input or "", "", "")):
            Path(files[name]).write_text(text, encoding="utf-8")
        request = dict(tool=tool, argv0=path, argv=args, cwd=cwd, env=env, **files)
        server.stdin.write((json.dumps(request) + "\n").encode())
        pid = _read(server, 60)["pid"]
        reply = _read(server, timeout)
        if reply is None:
            os.kill(pid, signal.SIGKILL)
            _read(server, 60)
            raise subprocess.TimeoutExpired([tool, *args], timeout)
        out = Path(files["stdout"]).read_text(encoding="utf-8", errors="replace")
        err = Path(files["stderr"]).read_text(encoding="utf-8", errors="replace")
    return subprocess.CompletedProcess([path, *args], reply["exit"], out, err)
