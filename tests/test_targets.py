"""experiments.targets: the fast-compute targets judged from bench.json / throughput.json."""

import copy
import json
import tarfile

import pytest

from conftest import ROOT
from experiments import targets

pytestmark = pytest.mark.experiments

CPU_BENCH = ROOT / "docs" / "results" / "bench" / "bench.json"


def gpu_bench(dtype="bfloat16", ratios=None, tflops=600.0):
    """A bench.json as the CUDA mode writes it, with chosen f = 0.8 ratios per token count."""
    ratios = ratios or {4096: 0.70, 16384: 0.60, 65536: 0.62}
    records = []
    for tokens, ratio in ratios.items():
        for impl in ("ours", "ours_trimmed"):
            for f, r, ms in ((0.0, 1.0, 4.0), (0.8, ratio, 4.0 * ratio)):
                scale = 1.1 if dtype == "float16" else 1.0
                records.append(dict(impl=impl, tokens=tokens, fraction=f, fwdbwd_ratio=r,
                                    fwdbwd_ms=ms * scale * (0.9 if impl == "ours_trimmed" else 1.0),
                                    fwdbwd_tflops=tflops if f == 0.0 else tflops * 0.8))
    meta = dict(device="cuda", dtype=dtype, experts=16, dim=1024, ffn=4096, machine="NVIDIA H200")
    return dict(meta=meta, records=records, checks=[], notes=[])


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def rows_of(capsys, *paths):
    assert targets.main([*map(str, paths), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    return {r["measurement"]: r for r in out["targets"]}, out["side"]


def test_cpu_bench_decides_only_the_cpu_target(capsys):
    rows, side = rows_of(capsys, CPU_BENCH)
    cpu = rows["CPU fp32, 80% single-expert"]
    ratio = next(r["fwdbwd_ratio"] for r in json.loads(CPU_BENCH.read_text())["records"]
                 if r["impl"] == "ours" and r["fraction"] == 0.8)
    assert cpu["value"] == ratio and cpu["verdict"] == ("met" if ratio <= 0.72 else "missed")
    others = [r for name, r in rows.items() if name != "CPU fp32, 80% single-expert"]
    assert len(others) == 5 and all(r["verdict"] == "not measured" for r in others)
    assert side == []


def test_gpu_bench_met_and_missed_at_each_bound(tmp_path, capsys):
    path = write(tmp_path / "bench" / "bench.json", gpu_bench(tflops=540.0))
    rows, _ = rows_of(capsys, path)
    assert rows["GPU bf16, 16k tokens, 80% single-expert"]["verdict"] == "met"       # 0.60 <= 0.62
    assert rows["GPU bf16, 64k tokens, 80% single-expert"]["verdict"] == "missed"    # 0.62 > 0.61
    assert rows["GPU bf16, 4k tokens, 80% single-expert"]["verdict"] == "met"        # 0.70 <= 0.75
    tf = rows["top-2 throughput at 64k tokens (GPU bf16, fwd+bwd)"]
    assert tf["verdict"] == "missed" and tf["value"] == 540.0
    assert rows["CPU fp32, 80% single-expert"]["verdict"] == "not measured"


def test_a_toy_or_fp16_bench_is_not_a_gpu_figure(tmp_path, capsys):
    toy = gpu_bench()
    toy["meta"]["dim"] = 64
    rows, _ = rows_of(capsys, write(tmp_path / "a.json", toy),
                      write(tmp_path / "b.json", gpu_bench(dtype="float16")))
    assert rows["GPU bf16, 16k tokens, 80% single-expert"]["verdict"] == "not measured"


def test_fp16_and_trimmed_side_figures(tmp_path, capsys):
    _, side = rows_of(capsys, write(tmp_path / "bf16.json", gpu_bench()),
                      write(tmp_path / "fp16.json", gpu_bench(dtype="float16")))
    assert "- fp16 weights (fairseq --fp16) vs bf16, 16384 tokens, f=0: 4.40 ms vs 4.00 ms (1.10x)" in side
    assert "- ours_trimmed vs ours, 65536 tokens, f=0.8: 2.23 ms vs 2.48 ms (0.90x)" in side


def test_end_to_end_needs_a_gpu_run(tmp_path, capsys):
    run = dict(command=["--data-bin", "d", "--gpu"], machine="NVIDIA H200", schemes=["top2", "adaptive"],
               runs=dict(top2=dict(moe_2x=1.0), adaptive=dict(moe_2x=0.4)),
               ratio_to_first=dict(top2=1.0, adaptive=1.4))
    cpu_run = copy.deepcopy(run)
    cpu_run["command"] = ["--data-bin", "d"]
    rows, _ = rows_of(capsys, write(tmp_path / "gpu" / "throughput.json", run))
    e2e = rows["end-to-end words/s, adaptive vs top2 (GPU)"]
    assert e2e["verdict"] == "met" and e2e["figure"] == "1.400x (two-expert 40%)"
    rows, _ = rows_of(capsys, write(tmp_path / "cpu" / "throughput.json", cpu_run))
    assert rows["end-to-end words/s, adaptive vs top2 (GPU)"]["verdict"] == "not measured"


def test_a_gpu_check_archive(tmp_path, capsys):
    write(tmp_path / "work" / "bench" / "bench.json", gpu_bench())
    archive = tmp_path / "gpu_check.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "work", arcname=".")
    rows, _ = rows_of(capsys, archive)
    row = rows["GPU bf16, 16k tokens, 80% single-expert"]
    assert row["verdict"] == "met" and row["source"] == f"{archive}:bench/bench.json (NVIDIA H200)"
    assert targets.main([str(archive)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| measurement | target | figure | verdict | run |")
    assert "| GPU bf16, 16k tokens, 80% single-expert | <= 0.62x top-2 | 0.600x (ours, 16384 tokens) | met |" in table


@pytest.mark.parametrize("name,content,message", [
    ("missing.json", None, "no such file or folder"),
    ("text.json", "not json", "not readable JSON"),
    ("other.json", '{"a": 1}', "neither a bench.json nor a throughput.json"),
    ("broken.tgz", "not an archive", "not a readable archive"),
])
def test_bad_paths_one_line_exit_2(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    assert targets.main([str(path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1
    assert err[0].startswith("targets.py: error:") and message in err[0]
