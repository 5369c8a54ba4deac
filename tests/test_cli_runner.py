"""The tests' way of running console commands (``cli_runner``): a command forked from the server
must give what a new process gives (exit status, standard output and error, directory,
environment)."""

import os

import pytest

import cli_runner
from conftest import USER_DIR

pytestmark = pytest.mark.slow


def both(tool, *args, **kw):
    kw.setdefault("env", dict(os.environ, PYTHONWARNINGS="ignore"))
    forked = cli_runner.run(tool, args, **kw)
    fresh = cli_runner.run(tool, args, fresh=True, **kw)
    return forked, fresh


def test_a_usage_error_gives_the_same_status_and_message(tmp_path):
    forked, fresh = both("adaptive-moe-routing", "--nope", cwd=tmp_path)
    assert forked.returncode == fresh.returncode == 2
    # (a new process also logs what its imports say, e.g. fairseq's tensorboardX notice)
    usage = lambda p: p.stderr[p.stderr.index("usage:"):]  # noqa: E731
    assert usage(forked) == usage(fresh) and forked.stdout == fresh.stdout == ""
    assert forked.stderr.strip().splitlines()[-1].startswith("adaptive-moe-routing: error:")


def test_the_plugins_one_line_errors_and_fairseqs_tracebacks_match(tmp_path):
    # the plugin's boundary: one line and status 1 (a bad --moe-* value, before any data is read)
    args = [str(tmp_path / "no-data"), "--user-dir", USER_DIR, "--task", "translation",
            "--arch", "adaptive_moe_transformer_tiny", "--max-tokens", "100", "--cpu",
            "--moe-threshold", "-1", "--save-dir", str(tmp_path / "save")]
    forked, fresh = both("fairseq-train", *args, cwd=tmp_path)
    assert forked.returncode == fresh.returncode == 1
    last = lambda p: p.stderr.strip().splitlines()[-1]  # noqa: E731
    assert last(forked) == last(fresh) and "--moe-threshold" in last(forked)
    # an uncaught error inside fairseq: Python's traceback and status 1
    forked, fresh = both("fairseq-train", str(tmp_path), "--task", "translation", "--arch",
                         "transformer", cwd=tmp_path)
    assert forked.returncode == fresh.returncode == 1
    assert last(forked) == last(fresh) and last(forked).startswith("AssertionError")
    assert not (tmp_path / "save").exists()


def test_directory_and_environment_reach_the_command(tmp_path):
    env = dict(os.environ, LOGLEVEL="ERROR", PYTHONWARNINGS="ignore")
    (tmp_path / "in.txt").write_text("x\n")
    args = ["--only-source", "--trainpref", "in.txt", "--destdir", "out", "--workers", "1"]
    for fresh in (False, True):
        proc = cli_runner.run("fairseq-preprocess", args, cwd=tmp_path, env=env,
                              fresh=fresh)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / "out" / "dict.txt").read_text().startswith("x 1\n")
        assert "| INFO |" not in proc.stdout + proc.stderr  # LOGLEVEL=ERROR was seen
        (tmp_path / "out" / "dict.txt").unlink()


@pytest.mark.parametrize("tool, args, forked", [
    ("fairseq-train", ["--user-dir", USER_DIR], True),
    ("fairseq-train", ["--help"], False),
    ("adaptive-moe-routing", ["-h"], False),
    ("fairseq-train", ["--user-dir", "/elsewhere/fairseq_adaptive_moe"], False),
    ("torchrun", ["--nproc_per_node", "2"], False),
])
def test_what_runs_forked(tool, args, forked, monkeypatch):
    monkeypatch.delenv("ADAPTIVE_MOE_TEST_SUBPROCESS", raising=False)
    assert cli_runner._forkable(tool, args, fresh=False) is forked
    assert cli_runner._forkable(tool, args, fresh=True) is False
    monkeypatch.setenv("ADAPTIVE_MOE_TEST_SUBPROCESS", "1")
    assert cli_runner._forkable(tool, args, fresh=False) is False
