"""examples/translation/throughput.py and timed_train.py --moe-timing, end to end on a tiny slice."""

import json

import pytest

from conftest import load_script

throughput = load_script("examples/translation/throughput.py")


@pytest.fixture(scope="module")
def measured(m30k_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "out"
    rc = throughput.main(["--data-bin", str(m30k_bin), "--out", str(out), "--max-update", "8",
                          "--skip", "3", "--max-tokens", "1500", "--threads", "1",
                          "--extra", "--log-interval 1"])
    assert rc == 0
    return out, json.loads((out / "throughput.json").read_text())


def test_every_update_is_timed_with_words_and_moe_time(measured):
    out, report = measured
    assert report["schemes"] == ["top2", "adaptive"]
    for scheme in report["schemes"]:
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


def test_two_expert_share_comes_from_fairseq_logs(measured):
    _, report = measured
    assert report["runs"]["top2"]["moe_2x"] == pytest.approx(1.0)
    assert 0 <= report["runs"]["adaptive"]["moe_2x"] <= 1
    assert report["ratio_to_first"]["top2"] == 1.0


def test_table_names_the_command_and_machine(measured):
    out, report = measured
    md = (out / "throughput.md").read_text()
    assert "throughput.py --data-bin" in md and report["machine"] in md
    assert md.count("| top2 |") == 1 and "| adaptive, T = 0.1 |" in md


@pytest.mark.parametrize("extra,message", [
    (["--schemes", "top2,nope"], "unknown ['nope']"),
    (["--schemes", "top2,top2"], "twice"),
    (["--skip", "10", "--max-update", "10"], "--skip"),
    (["--threshold", "2"], "--threshold"),
    (["--max-update", "x"], "invalid int value"),
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
