"""experiments.throughput and experiments.timed_train --moe-timing, end to end on a tiny slice."""

import json

import pytest

from experiments import throughput

pytestmark = [pytest.mark.experiments, pytest.mark.slow]


@pytest.fixture(scope="module")
def measured(m30k_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "out"
    rc = throughput.main(["--data-bin", str(m30k_bin), "--out", str(out), "--max-update", "8",
                          "--skip", "3", "--max-tokens", "1500", "--threads", "1",
                          "--schemes", "top2,adaptive,dense", "--extra", "--log-interval 1"])
    assert rc == 0
    return out, json.loads((out / "throughput.json").read_text())


def test_every_update_is_timed_with_words_and_moe_time(measured):
    out, report = measured
    assert report["schemes"] == ["top2", "adaptive", "dense"]
    for scheme in ["top2", "adaptive"]:
        lines = [json.loads(x) for x in (out / "runs" / scheme / "timing.jsonl").read_text().splitlines()]
        assert [r["update"] for r in lines] == list(range(1, 9))
        for r in lines:
            assert r["words"] > 0 and r["step_s"] > 0
            assert r["moe_fwd_ms"] > 0 and r["moe_bwd_ms"] > 0
            assert r["moe_fwd_ms"] + r["moe_bwd_ms"] < 1e3 * r["step_s"]
        run = report["runs"][scheme]
        window = lines[3:]
        assert run["updates"] == 5
        assert run["words"] == sum(r["words"] for r in window)
        assert run["words_per_s"] == pytest.approx(run["words"] / sum(r["step_s"] for r in window))
        assert 0 < run["moe_share"] < 1
        assert run["ffn_ms"] == pytest.approx(
            sum(r["moe_fwd_ms"] + r["moe_bwd_ms"] for r in window) / 5)


def test_dense_ffn_time_is_a_column(measured):
    """The dense run times its FFN sublayers (fc1 ... fc2) where MoE runs time their MoE layers;
    the table sets each beside the dense one."""
    out, report = measured
    lines = [json.loads(x) for x in (out / "runs" / "dense" / "timing.jsonl").read_text().splitlines()]
    for r in lines:
        assert r["moe_fwd_ms"] == 0 and r["moe_bwd_ms"] == 0
        assert r["dense_ffn_fwd_ms"] > 0 and r["dense_ffn_bwd_ms"] > 0
        assert r["dense_ffn_fwd_ms"] + r["dense_ffn_bwd_ms"] < 1e3 * r["step_s"]
    dense, top2 = report["runs"]["dense"], report["runs"]["top2"]
    assert dense["ffn_ms"] == pytest.approx(
        sum(r["dense_ffn_fwd_ms"] + r["dense_ffn_bwd_ms"] for r in lines[3:]) / 5)
    md = (out / "throughput.md").read_text()
    assert "| FFN time vs dense | step vs dense |" in md
    row = next(x for x in md.splitlines() if x.startswith("| top2 |")).split("|")
    assert row[-3].strip() == f"{top2['ffn_ms'] / dense['ffn_ms']:.2f}x"
    assert row[-2].strip() == f"{top2['step_ms'] / dense['step_ms']:.2f}x"
    dense_row = next(x for x in md.splitlines() if x.startswith("| dense |")).split("|")
    assert dense_row[-3].strip() == "1.00x"


def test_two_expert_share_comes_from_fairseq_logs(measured):
    _, report = measured
    assert report["runs"]["top2"]["moe_2x"] == pytest.approx(1.0)
    assert 0 <= report["runs"]["adaptive"]["moe_2x"] <= 1
    assert report["ratio_to_first"]["top2"] == 1.0


def test_table_names_the_command_and_machine(measured):
    out, report = measured
    md = (out / "throughput.md").read_text()
    assert "python -m experiments.throughput --data-bin" in md and report["machine"] in md
    assert md.count("| top2 |") == 1 and "| adaptive, T = 0.1 |" in md


@pytest.mark.parametrize("extra,message", [
    (["--schemes", "top2,nope"], "unknown ['nope']"),
    (["--schemes", "top2,top2"], "twice"),
    (["--skip", "10", "--max-update", "10"], "--skip"),
    (["--threshold", "2"], "--threshold"),
    (["--max-update", "x"], "invalid int value"),
    (["--windows", "-1"], "--windows"),
    (["--time-budget", "-5"], "--time-budget"),
    (["--time-budget", "nan"], "--time-budget"),
    (["--reuse-runs"], "no finished runs"),
])
def test_bad_input_one_line_exit_2(m30k_bin, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert throughput.main(["--data-bin", str(m30k_bin), "--out", str(out)] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("throughput.py: error:") and message in err[0]
    assert not out.exists()


def test_missing_data_bin(tmp_path, capsys):
    assert throughput.main(["--data-bin", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no dict" in capsys.readouterr().err


def test_windows_from_the_finished_runs(measured, m30k_bin):
    """--reuse-runs --windows re-tabulates the runs on disk: no training, windows that add up."""
    out, report = measured
    common = ["--data-bin", str(m30k_bin), "--out", str(out), "--max-update", "8", "--skip", "3",
              "--max-tokens", "1500", "--threads", "1", "--schemes", "top2,adaptive,dense", "--extra", "--log-interval 1"]
    runs_before = {p: p.stat().st_mtime for p in out.glob("runs/*/*")}
    assert throughput.main(common + ["--reuse-runs", "--windows", "3"]) == 0
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/*")} == runs_before  # nothing retrained
    again = json.loads((out / "throughput.json").read_text())
    assert again["runs"] == report["runs"] and again["machine"] == report["machine"]
    wins = again["windows"]
    assert [(w["first"], w["last"]) for w in wins] == [(1, 3), (4, 6), (7, 8)]
    for scheme in report["schemes"]:
        lines = [json.loads(x) for x in (out / "runs" / scheme / "timing.jsonl").read_text().splitlines()]
        assert sum(w["runs"][scheme]["words"] for w in wins) == sum(r["words"] for r in lines)
    assert all(w["runs"]["top2"]["moe_2x"] == pytest.approx(1.0) for w in wins)
    md = (out / "throughput.md").read_text()
    assert "in windows of 3 updates" in md and "| 7-8 |" in md


def test_reuse_refuses_runs_made_with_other_flags(measured, m30k_bin, capsys):
    out, _ = measured
    before = (out / "throughput.json").read_text()
    argv = ["--data-bin", str(m30k_bin), "--out", str(out), "--max-update", "8", "--skip", "3",
            "--max-tokens", "1000", "--threads", "1", "--extra", "--log-interval 1", "--reuse-runs"]
    assert throughput.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with other flags" in err[0]
    assert (out / "throughput.json").read_text() == before


def test_time_budget_stops_each_run_and_compares_the_common_updates(m30k_bin, tmp_path):
    """--time-budget: fairseq's --stop-time-hours ends each run well before --max-update; the
    figures and windows cover the updates every scheme reached, and each scheme's own count is
    kept."""
    out = tmp_path / "out"
    rc = throughput.main(["--data-bin", str(m30k_bin), "--out", str(out), "--max-update", "100000",
                          "--skip", "1", "--max-tokens", "1500", "--threads", "1",
                          "--time-budget", "4", "--windows", "2", "--extra", "--log-interval 1"])
    assert rc == 0
    report = json.loads((out / "throughput.json").read_text())
    reached = {s: report["runs"][s]["updates_reached"] for s in report["schemes"]}
    for scheme, n in reached.items():
        lines = [json.loads(x) for x in (out / "runs" / scheme / "timing.jsonl").read_text().splitlines()]
        assert max(r["update"] for r in lines) == n
        assert 1 < n < 100000
        assert "--stop-time-hours" in (out / "runs" / scheme / "train-command.txt").read_text()
        assert "Stopping training due to cumulative_training_time" in (
            out / "runs" / scheme / "train.log").read_text()
    stop = min(reached.values())
    for scheme in report["schemes"]:
        assert report["runs"][scheme]["updates"] == stop - 1
    assert report["windows"][-1]["last"] == stop
    md = (out / "throughput.md").read_text()
    assert f"figures over updates 2-{stop} of each run" in md
    assert "Each scheme trained for 4 s of training time" in md
