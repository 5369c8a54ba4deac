"""experiments/gpu/run.sh: the GPU measurement suite in one command, run at toy size on the CPU."""

import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.experiments, pytest.mark.slow]

SCRIPT = ROOT / "experiments" / "gpu" / "run.sh"


def run(out, *stages, work, **env_extra):
    env = dict(os.environ, CPU="1", PYTHON=sys.executable, PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="2", WORK=str(work), **env_extra)
    return subprocess.run(["bash", str(SCRIPT), str(out), *stages], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def unpacked(out, dest):
    """OUT holds only the archive and the summary: one file to copy back, one to read."""
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tgz", "summary.txt"]
    with tarfile.open(out / "gpu_check.tgz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def test_bench_stages_run_and_report(tmp_path):
    out = tmp_path / "out"
    proc = run(out, "bench", "fp16", "compiled", work=tmp_path / "work")
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("== summary: bench=0(") and " fp16=0(" in summary and " compiled=0(" in summary
    assert (out / "summary.txt").read_text().split()[0].startswith("bench=0(")
    got = unpacked(out, tmp_path / "got")
    impls = {r["impl"] for r in json.loads((got / "bench" / "bench.json").read_text())["records"]}
    assert {"ours", "ours_trimmed", "loop", "padded_einsum", "fairscale", "dense"} <= impls
    compiled = json.loads((got / "bench-compiled" / "bench.json").read_text())
    assert {r["impl"] for r in compiled["records"]} == {"ours", "ours_compiled"}
    assert compiled["meta"]["tokens_done"] == [256]
    fp16 = json.loads((got / "bench-fp16" / "bench.json").read_text())
    assert fp16["meta"]["dtype"] == "float16" and {r["impl"] for r in fp16["records"]} == {"ours"}
    assert all((got / f"{s}.log").is_file() for s in ("bench", "fp16", "compiled"))


def test_a_failing_stage_does_not_stop_the_next(tmp_path):
    out = tmp_path / "out"
    proc = run(out, "throughput", "bench", work=tmp_path / "work",
               TP_DATA=str(tmp_path / "no-data-bin"))
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("== summary: throughput=2(") and " bench=0(" in summary
    got = unpacked(out, tmp_path / "got")
    assert "no dict" in (got / "throughput.log").read_text()
    assert (got / "bench" / "bench.json").is_file()


def test_stages_past_the_deadline_are_skipped(tmp_path):
    out = tmp_path / "out"
    proc = run(out, "bench", "compiled", work=tmp_path / "work", END_AT=str(int(time.time()) + 40))
    assert proc.returncode == 0, proc.stderr
    assert "== bench: skipped" in proc.stdout
    assert [s.split("(")[0] for s in (out / "summary.txt").read_text().split()] == [
        "bench=skipped", "compiled=skipped"]
    assert not (tmp_path / "work" / "bench.log").exists()


def test_unknown_stage_runs_nothing(tmp_path):
    proc = run(tmp_path / "out", "bench", "nope", work=tmp_path / "work")
    assert proc.returncode == 2
    assert "unknown stage 'nope'" in proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_a_foreign_work_folder_is_left_alone(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    proc = run(tmp_path / "out", "bench", work=work)
    assert proc.returncode == 2
    assert "is not an earlier gpu_check work folder" in proc.stderr
    assert (work / "keep.txt").read_text() == "mine"
