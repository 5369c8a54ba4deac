"""scripts/gpu_check.sh: the one-call GPU measurement script, run at toy size on the CPU."""

import json
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(out, *stages, **env_extra):
    env = dict(os.environ, CPU="1", PYTHON=sys.executable, PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="2", **env_extra)
    return subprocess.run(["bash", str(SCRIPT), str(out), *stages], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_bench_stages_run_and_report(tmp_path):
    proc = run(tmp_path, "bench", "compiled")
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("== summary: bench=0(") and " compiled=0(" in summary
    impls = {r["impl"] for r in json.loads((tmp_path / "bench" / "bench.json").read_text())["records"]}
    assert {"ours", "ours_trimmed", "loop", "padded_einsum", "fairscale", "dense"} <= impls
    compiled = json.loads((tmp_path / "bench-compiled" / "bench.json").read_text())
    assert {r["impl"] for r in compiled["records"]} == {"ours", "ours_compiled"}
    assert (tmp_path / "bench.log").is_file() and (tmp_path / "compiled.log").is_file()


def test_a_failing_stage_does_not_stop_the_next(tmp_path):
    out = tmp_path / "out"
    proc = run(out, "throughput", "bench", TP_DATA=str(tmp_path / "no-data-bin"))
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("== summary: throughput=2(") and " bench=0(" in summary
    assert "no dict" in (out / "throughput.log").read_text()
    assert (out / "bench" / "bench.json").is_file()


def test_unknown_stage_runs_nothing(tmp_path):
    proc = run(tmp_path / "out", "bench", "nope")
    assert proc.returncode == 2
    assert "unknown stage 'nope'" in proc.stderr
    assert not (tmp_path / "out" / "bench.log").exists()
