"""adaptive-moe-bench (cli) and its library (tools.bench): the run completes and records
everything; no timing assertions."""

import json

import pytest
import torch

from fairseq_adaptive_moe.cli import bench as cli
from fairseq_adaptive_moe.tools import bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    rc = cli.main(["--device", "cpu", "--quick", "--out", str(out)])
    return rc, out


def test_quick_run_records_every_implementation_and_fraction(quick_run):
    rc, out = quick_run
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    records = data["records"]
    assert data["meta"]["command"].startswith("adaptive-moe-bench --device cpu --quick")
    for key in ("machine", "torch", "dtype", "cpu_threads", "experts", "dim", "ffn"):
        assert data["meta"][key]
    assert data["meta"]["cpu_block_mib"] == 16
    assert data["meta"]["cpu_pad_slack"] == 0.125
    assert data["meta"]["tokens_done"] == data["meta"]["tokens"]
    seen = {(r["impl"], r["fraction"]) for r in records}
    for impl in ("ours", "loop", "padded_einsum", "dense"):
        for f in bench.DEFAULT_FRACTIONS:
            assert (impl, f) in seen, (impl, f)
    assert ("fairscale", 0.0) in seen  # top-2 only
    assert not [r for r in records if r["impl"] == "ours_trimmed"]  # CPU: ours already trims
    assert any(n.startswith("ours_trimmed not timed") for n in data["notes"])
    for r in records:
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0
        assert r["fwd_tflops"] > 0 and r["fwdbwd_tflops"] > 0
        assert r["rows"] == 2 * r["tokens"] - r["single_expert_tokens"]
        if r["fraction"] == 0.0:
            assert r["fwd_ratio"] == 1.0 and r["fwdbwd_ratio"] == 1.0
    assert all(c["max_abs_diff"] < 1e-4 for c in data["checks"])
    png = out / "bench.png"
    assert png.is_file() and png.stat().st_size > 0


def test_dense_relative_ratio_at_f1_and_f08(quick_run, capsys):
    """The bench gives ours against the dense FFN over the same rows (json and printed line)."""
    _, out = quick_run
    data = json.loads((out / "bench.json").read_text())
    by = {(r["impl"], r["tokens"], r["fraction"]): r for r in data["records"]}
    ratios = {(v["tokens"], v["fraction"]): v for v in data["vs_dense"]}
    for (tokens, f), v in ratios.items():
        ours, dense = by["ours", tokens, f], by["dense", tokens, f]
        assert v["fwdbwd"] == pytest.approx(ours["fwdbwd_ms"] / dense["fwdbwd_ms"])
        assert v["fwd"] == pytest.approx(ours["fwd_ms"] / dense["fwd_ms"])
    assert {f for _, f in ratios} >= {1.0, 0.8}
    line = bench.dense_summary(data["records"])[0]
    one = ratios[data["meta"]["tokens"][0], 1.0]["fwdbwd"]
    assert line.startswith("ours vs a dense FFN over the same rows") and f"f=1 {one:.2f}x" in line
    assert "f=0.8" in line


@pytest.mark.parametrize("num_tokens,num_experts", [(256, 4), (1000, 8), (37, 2), (64, 3)])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.8, 1.0, 0.33])
def test_crafted_decision_has_exact_single_expert_fraction(num_tokens, num_experts, fraction):
    decision = bench.craft_decision(num_tokens, num_experts, fraction, seed=3)
    per_token = decision.experts_per_token
    n_single = round(fraction * num_tokens)
    assert int((per_token == 1).sum()) == n_single
    assert int((per_token == 2).sum()) == num_tokens - n_single
    used = decision.expert_index[decision.used.all(dim=1)]
    assert (used[:, 0] != used[:, 1]).all()  # two distinct experts
    loads = bench.expert_loads(decision)
    assert int(loads.sum()) == 2 * num_tokens - n_single
    if num_experts > 2:  # balanced by construction (E = 2 may need a fallback pair)
        assert int(loads.max() - loads.min()) <= 1


def test_top2_crafted_decision_equals_top2_routing():
    logits = bench.craft_logits(128, 4, 0.0, seed=1)
    crafted = bench.craft_decision(128, 4, 0.0, seed=1)
    top2 = bench.route(logits, "top2")
    assert torch.equal(crafted.expert_index, top2.expert_index)
    assert crafted.used.all()


@pytest.mark.parametrize("argv", [
    ["--fractions", "0.5,1.5"],
    ["--fractions", "-0.1"],
    ["--experts", "0"],
    ["--experts", "1"],
    ["--dim", "-4"],
    ["--ffn", "0"],
    ["--tokens", "0"],
    ["--repeats", "0"],
    ["--warmup", "-1"],
    ["--implementations", "ours,nope"],
    ["--dtype", "int8"],
    ["--cpu-block-mib", "-1"],
    ["--cpu-pad-slack", "-0.5"],
    ["--cpu-pad-slack", "nan"],
    ["--no-such-flag"],
])
def test_bad_flags_exit_2_and_write_nothing(argv, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(argv + ["--quick", "--out", str(out)]) == 2
    assert not out.exists()
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptive-moe-bench: error:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["--device", "cuda", "--out", str(out)]) == 2
    assert not out.exists()
    assert "no CUDA device" in capsys.readouterr().err


def test_correctness_guard_fails_loudly(monkeypatch, tmp_path, capsys):
    reference = bench.loop_moe
    monkeypatch.setattr(bench, "loop_moe", lambda x, d, e: reference(x, d, e) * 1.01)
    out = tmp_path / "out"
    assert cli.main(["--quick", "--implementations", "ours,loop", "--out", str(out)]) == 1
    assert "correctness check failed: ours != loop" in capsys.readouterr().err
    assert not out.exists()


def test_each_finished_token_count_is_kept(monkeypatch, tmp_path, capsys):
    """bench.json is rewritten after every token count: a run that stops at the second count
    (here its correctness guard fails there) keeps the first count's records."""
    reference = bench.loop_moe

    def loop_wrong_at_128(x, d, e):
        out = reference(x, d, e)
        return out * 1.01 if x.shape[0] == 128 else out

    monkeypatch.setattr(bench, "loop_moe", loop_wrong_at_128)
    out = tmp_path / "out"
    argv = ["--quick", "--tokens", "64,128", "--implementations", "ours,loop", "--out", str(out)]
    assert cli.main(argv) == 1
    assert "correctness check failed: ours != loop" in capsys.readouterr().err
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["tokens_done"] == [64]
    assert {r["tokens"] for r in data["records"]} == {64}
    assert {(r["impl"], r["fraction"]) for r in data["records"]} == {
        (impl, f) for impl in ("ours", "loop") for f in bench.DEFAULT_FRACTIONS}


@pytest.mark.slow
def test_compiled_static_variant_in_bf16(tmp_path, capsys):
    """ours_compiled (torch.compile of the static plan, fullgraph) matches the fp32 loop, forward
    and backward, at every fraction; the CUDA-graph variant says why it cannot run here."""
    out = tmp_path / "out"
    rc = cli.main(["--quick", "--dtype", "bfloat16", "--out", str(out),
                     "--implementations", "ours,ours_compiled,ours_graphed,loop"])
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    compiled = [r for r in data["records"] if r["impl"] == "ours_compiled"]
    assert sorted(r["fraction"] for r in compiled) == list(bench.DEFAULT_FRACTIONS)
    checked = {c["fraction"] for c in data["checks"] if c["impl"] == "ours_compiled"}
    assert checked == set(bench.DEFAULT_FRACTIONS)
    assert all(c["reference"] == "loop (fp32)" for c in data["checks"])
    if not torch.cuda.is_available():
        assert any(n.startswith("ours_graphed skipped: CUDA graphs need a CUDA device")
                   for n in data["notes"])
    assert "ours_compiled built at 256 tokens" in capsys.readouterr().out


def test_static_variants_refuse_fp32_with_a_note(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["--quick", "--implementations", "ours,ours_compiled", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    assert not [r for r in data["records"] if r["impl"] == "ours_compiled"]
    assert any(n.startswith("ours_compiled skipped: needs bf16") for n in data["notes"])


def test_trimmed_plan_when_listed(tmp_path):
    """ours_trimmed (the plan that cuts rows to the used slots; the default on CPU, a host read
    on the GPU) is checked against the fp32 loop and timed at every fraction when listed."""
    out = tmp_path / "out"
    assert cli.main(["--quick", "--implementations", "ours,ours_trimmed,loop", "--out", str(out)]) == 0
    data = json.loads((out / "bench.json").read_text())
    timed = sorted(r["fraction"] for r in data["records"] if r["impl"] == "ours_trimmed")
    assert timed == list(bench.DEFAULT_FRACTIONS)
    checked = {c["fraction"] for c in data["checks"] if c["impl"] == "ours_trimmed"}
    assert checked == set(bench.DEFAULT_FRACTIONS)


def test_library_runs_without_the_cli_and_raises_instead_of_exiting(tmp_path):
    """From Python: make_config checks like the flags (raising BadFlag, no exit), run_bench
    measures and checks without writing anything unless given a directory."""
    with pytest.raises(bench.BadFlag, match="--experts must be >= 2"):
        bench.make_config("cpu", quick=True, experts=1)
    cfg = bench.make_config("cpu", quick=True, tokens=[64], fractions=[0.5],
                            implementations=["ours", "loop", "padded_einsum"])
    device = torch.device("cpu")
    run = bench.run_bench(cfg, device, bench.describe_run(cfg, device))
    assert {(r["impl"], r["fraction"]) for r in run.records} == {
        (i, f) for i in ("ours", "loop", "padded_einsum") for f in (0.0, 0.5)}
    assert {c["impl"] for c in run.checks} == {"ours", "padded_einsum"}
    assert not list(tmp_path.iterdir())
    assert run.write_json(tmp_path).name == "bench.json"
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["tokens_done"] == [64]


def test_padded_einsum_columns_are_the_routing_arrival_positions():
    """The padded dispatch puts slot (s, k) in column position_in_expert[s, k] of its expert
    (the positions a capacity limit cuts at), so capping at C = max load drops nothing."""
    from fairseq_adaptive_moe.moe.routing import position_in_expert

    decision = bench.craft_decision(40, 4, 0.5, seed=2)
    position = position_in_expert(decision.expert_index, decision.used, 4)
    loads = bench.expert_loads(decision)
    for e in range(4):
        at_e = position[decision.used & decision.expert_index.eq(e)]
        assert sorted(at_e.tolist()) == list(range(int(loads[e])))
    capped = bench.route(decision.logits, "adaptive", threshold=bench.THRESHOLD,
                         capacity=int(loads.max()))
    assert torch.equal(capped.used, decision.used)
    torch.manual_seed(0)
    experts = bench.ExpertFFN(4, 8, 16, seed=0)
    x = torch.randn(40, 8)
    torch.testing.assert_close(bench.padded_einsum_moe(x, decision, experts),
                               bench.loop_moe(x, decision, experts), atol=1e-5, rtol=1e-5)
