"""experiments.generation and experiments.optimizer_step, end to end at a tiny shape (their
figures are benchmarks; these check that the runners measure what they say)."""

import json

import pytest

from experiments import generation, optimizer_step

pytestmark = [pytest.mark.experiments, pytest.mark.slow]


def test_generation_runner_sets_moe_beside_dense(m30k_bin, tmp_path):
    out = tmp_path / "gen"
    rc = generation.main(["--data-bin", str(m30k_bin), "--out", str(out), "--dim", "32",
                          "--ffn", "64", "--layers", "1", "--experts", "2", "--length", "5",
                          "--beam", "2", "--batchings", "max-tokens:2000,batch-size:8",
                          "--interactive-sentences", "3", "--threads", "1"])
    assert rc == 0
    report = json.loads((out / "generation.json").read_text())
    rows = {r["label"]: r for r in report["results"]}
    assert list(rows) == ["dense", "moe, top1 inference", "moe, train inference"]
    for r in rows.values():
        assert r["max-tokens:2000"]["sentences"] == 60 and r["max-tokens:2000"]["s"] > 0
        assert r["batch-size:8"]["sentences"] == 60
        assert r["interactive"]["sentences"] == 3
    # forced length: every hypothesis has exactly --length tokens (plus </s>)
    log = (out / "gen-moe-top1-batch-size8.log").read_text()
    hyps = [line.split("\t")[2] for line in log.splitlines() if line.startswith("H-")]
    assert len(hyps) == 60 and all(len(h.split()) == 5 for h in hyps)
    md = (out / "generation.md").read_text()
    top1 = rows["moe, top1 inference"]["batch-size:8"]["s"]
    dense = rows["dense"]["batch-size:8"]["s"]
    assert f"({top1 / dense:.2f}x)" in md
    import torch
    dense_keys = torch.load(out / "dense" / "checkpoint_last.pt", weights_only=True)["model"]
    moe_keys = torch.load(out / "moe" / "checkpoint_last.pt", weights_only=True)["model"]
    assert not [k for k in dense_keys if "expert" in k] and [k for k in moe_keys if "expert" in k]


def test_generation_runner_bad_input(m30k_bin, tmp_path, capsys):
    assert generation.main(["--data-bin", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no dict.en.txt" in capsys.readouterr().err
    assert generation.main(["--data-bin", str(m30k_bin), "--out", str(tmp_path / "o"),
                            "--batchings", "beam:3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batchings" in err[0]
    assert not (tmp_path / "o").exists()


def test_optimizer_step_runner(tmp_path):
    out = tmp_path / "opt"
    assert optimizer_step.main(["--out", str(out), "--arch", "adaptive_moe_transformer_tiny",
                                "--vocab", "500", "--repeats", "1", "--threads", "1"]) == 0
    report = json.loads((out / "optimizer.json").read_text())["results"]
    moe, dense = report["moe"], report["dense"]
    assert dense["expert_params"] == 0 and moe["expert_params"] > 0
    # the tiny model: 4 experts per FFN, so the MoE holds about 3 more FFNs' worth per layer
    assert moe["params"] > dense["params"]
    assert {"fairseq", "torch_foreach"} <= set(moe["step_ms"])
    assert all(v > 0 for r in (moe, dense) for v in r["step_ms"].values())
    assert "| moe / dense |" in (out / "optimizer.md").read_text()


def test_profile_runner_breaks_both_down(tmp_path):
    from experiments import profile_layer

    out = tmp_path / "prof"
    assert profile_layer.main(["--out", str(out), "--shapes", "4:16:32:64", "--repeats", "1",
                               "--threads", "1"]) == 0
    r = json.loads((out / "profile.json").read_text())["results"][0]
    assert r["shape"]["rows"] == 64  # f = 1: one row per token
    for impl in ("ours", "dense"):
        cats = r[impl]["categories"]
        assert cats["GEMM"] > 0
        assert sum(cats.values()) == pytest.approx(r[impl]["total_ms"])
    assert "sort / search / top-k" in r["ours"]["categories"]  # the dispatch plan's argsort
    assert "| GEMM |" in (out / "profile.md").read_text()


def test_profile_runner_profiles_either_expert_path(tmp_path, monkeypatch):
    """Balanced crafted groups take the padded, batched path by default; ``--pad-slack -1``
    profiles the grouped GEMMs instead (the class setting is restored after the test)."""
    from experiments import profile_layer
    from fairseq_adaptive_moe.moe import ExpertFFN

    monkeypatch.setattr(ExpertFFN, "pad_slack", ExpertFFN.pad_slack)
    ops = {}
    for name, extra in (("padded", []), ("grouped", ["--pad-slack", "-1"])):
        out = tmp_path / name
        assert profile_layer.main(["--out", str(out), "--shapes", "4:16:32:64", "--repeats", "1",
                                   "--threads", "1"] + extra) == 0
        r = json.loads((out / "profile.json").read_text())["results"][0]
        ops[name] = {op for op, _ in r["ours"]["top"]}
    assert "aten::baddbmm" in ops["padded"] and "aten::_grouped_mm" not in ops["padded"]
    assert "aten::_grouped_mm" in ops["grouped"] and "aten::baddbmm" not in ops["grouped"]


def test_small_calls_runner_times_both_paths_and_dense(tmp_path):
    from experiments import small_calls
    from fairseq_adaptive_moe.moe import ExpertFFN

    out = tmp_path / "small"
    assert small_calls.main(["--out", str(out), "--rows", "4", "--used", "1,2", "--experts", "4",
                             "--dim", "16", "--ffn", "32", "--calls", "2", "--rounds", "2",
                             "--threads", "1"]) == 0
    results = json.loads((out / "small_calls.json").read_text())["results"]
    assert [r["used"] for r in results] == [1, 2]
    for r in results:
        assert set(r["us"]) == {"small-call path", "grouped path", "dense"}
        assert all(v > 0 for v in r["us"].values())
        assert all(len(v) == 2 for v in r["samples_us"].values())
    assert "| small-call / grouped |" in (out / "small_calls.md").read_text()
    assert ExpertFFN.loops_small_calls  # the class setting is left alone


@pytest.mark.parametrize("argv", [["--used", "6"], ["--used", "0"], ["--used", "a"], ["--rows", "0"]])
def test_small_calls_runner_rejects_bad_flags(argv, tmp_path, capsys):
    from experiments import small_calls

    with pytest.raises(SystemExit) as err:
        small_calls.main(["--out", str(tmp_path / "x"), "--rows", "5", "--experts", "4"] + argv)
    assert err.value.code == 2 and not (tmp_path / "x").exists()
    assert "small_calls.py: error:" in capsys.readouterr().err
