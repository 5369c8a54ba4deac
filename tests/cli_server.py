"""The tests' fork server for console commands (see ``cli_runner``).

Started once per test process (``python cli_server.py``), it imports torch, fairseq and the plugin,
then reads one JSON request per line on stdin: ``{"tool", "argv", "cwd", "env", "stdin",
"stdout", "stderr"}``. For each it forks a child that runs the command as its console script would
(``sys.exit(entry_point())``) with those arguments, directory, environment and files as file
descriptors 0, 1 and 2, and answers two lines on stdout: ``{"pid": ...}`` at once, ``{"exit":
code}`` when the child ends (as ``subprocess`` gives it: minus the signal's number when the
child was killed).
End of stdin ends the server.
"""

import importlib
import io
import json
import logging
import os
import sys
import warnings
from importlib.metadata import entry_points

#: what every command imports first; the children get them for free
PRELOAD = ["torch", "fairseq", "fairseq.options", "fairseq_cli.train", "fairseq_cli.generate",
           "fairseq_cli.interactive", "fairseq_cli.eval_lm", "fairseq_cli.preprocess",
           "fairseq_adaptive_moe"]


def _entry_point(tool: str):
    found = [ep for ep in entry_points(group="console_scripts") if ep.name == tool]
    if not found:
        raise ValueError(f"no console script {tool!r} in this environment")
    return found[0]


def _child(req) -> int:
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path, flags in ((0, req["stdin"], os.O_RDONLY), (1, req["stdout"], os.O_WRONLY),
                            (2, req["stderr"], os.O_WRONLY)):
        handle = os.open(path, flags)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  line_buffering=True)
    warnings.resetwarnings()
    if os.environ.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ep = _entry_point(req["tool"])
    sys.argv = [req["argv0"], *req["argv"]]
    # a new interpreter has no logging configured until the command's module does it at import
    # (fairseq_cli.* call logging.basicConfig at module level, on the stdout of that moment):
    # drop what the server's imports configured and import the command's module again
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    module = importlib.import_module(ep.module)
    if ep.module.startswith("fairseq_cli."):
        module = importlib.reload(module)
    code = 0
    try:
        result = getattr(module, ep.attr)()
        sys.exit(result)
    except SystemExit as e:  # what the interpreter does with sys.exit(x)
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            sys.stderr.write(f"{e.code}\n")
            code = 1
    except BaseException:  # noqa: BLE001  (an uncaught error: the excepthook, then status 1)
        sys.excepthook(*sys.exc_info())
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def main() -> None:
    warnings.simplefilter("ignore")
    for name in PRELOAD:
        importlib.import_module(name)
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    reply.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                reply.close()
                code = _child(req)
            finally:
                os._exit(code)
        reply.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        reply.write(json.dumps({"exit": code}) + "\n")


if __name__ == "__main__":
    main()
