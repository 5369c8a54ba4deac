"""experiments.compare: paper Table 3 / 5 at small scale, end to end on a tiny slice."""

import json

import pytest

from experiments import compare

pytestmark = [pytest.mark.experiments, pytest.mark.slow]


@pytest.fixture(scope="module")
def compared(m30k_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    rc = compare.main(["--data-bin", str(m30k_bin), "--out", str(out),
                       "--schemes", "dense,top2,adaptive", "--max-update", "6",
                       "--validate-interval-updates", "3", "--max-tokens", "1500",
                       "--beam", "1", "--max-len-b", "8", "--threads", "1"])
    assert rc == 0
    return out, json.loads((out / "compare.json").read_text())


def test_runs_recorded(compared):
    out, report = compared
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["dense", "top2", "adaptive"]
    assert report["reference"] == "top2"
    for name, r in runs.items():
        assert r["updates"] == 6
        assert r["train_wall_s"] > 0
        assert [v["update"] for v in r["valid"]][:2] == [3, 6]
        assert all(v["train_wall_s"] > 0 for v in r["valid"])
        assert isinstance(r["bleu"], float) and r["bleu"] >= 0
        assert r["best_valid_loss"] == min(v["loss"] for v in r["valid"])
        assert (out / "runs" / name / "result.json").is_file()
        assert (out / "runs" / name / "train.log").is_file()
    assert runs["dense"]["bleu_top1"] is None
    assert isinstance(runs["adaptive"]["bleu_top1"], float)
    assert runs["top2"]["train_moe_2x"] == 1.0
    assert 0.0 <= runs["adaptive"]["train_moe_2x"] <= 1.0
    # the default target is the worst best valid loss, so every run reaches it
    assert report["target_valid_loss"] == max(r["best_valid_loss"] for r in runs.values())
    assert all(r["to_target"] is not None for r in runs.values())
    assert (out / "compare.png").stat().st_size > 1000
    md = (out / "compare.md").read_text()
    assert "paper: adaptive" in md and "0.79x" in md and "| adaptive |" in md


def test_flops_follow_the_formula(compared):
    _, report = compared
    runs = {r["name"]: r for r in report["runs"]}
    dense, top2, adaptive = runs["dense"], runs["top2"], runs["adaptive"]
    assert dense["flops_per_token"] < adaptive["flops_per_token"] <= top2["flops_per_token"]

    cfg = adaptive["model"]
    d, f, E, V = cfg["encoder_embed_dim"], cfg["encoder_ffn_embed_dim"], cfg["moe_expert_count"], \
        cfg["vocab"]
    assert (cfg["encoder_layers"], cfg["decoder_layers"], d, f, E) == (2, 2, 64, 128, 4)
    assert V > 100  # the checkpoint's output projection
    S, T = adaptive["src_len"], adaptive["ctx_len"]
    assert S > 1 and T > 1
    shares = adaptive["train_moe_2x_layers"]
    assert sorted(shares) == ["dec0", "dec1", "enc0", "enc1"]
    # by hand (fairseq_adaptive_moe/tools/flops.py): one sentence pair, per S + T tokens
    enc_attn = 8 * d * d + 4 * S * d
    dec_attn = 8 * d * d + 4 * (T + 1) / 2 * d + 4 * d * d + 4 * S * d
    kv = 4 * d * d * S  # the encoder attention's k, v: per source token
    moe = lambda layer: (1 + shares[layer]) * 4 * d * f + 2 * d * E
    ffn = S * (moe("enc0") + moe("enc1")) + T * (moe("dec0") + moe("dec1"))
    total = 2 * S * enc_attn + 2 * T * dec_attn + 2 * kv + ffn + T * 2 * d * V
    assert adaptive["flops_per_token"] == pytest.approx(total / (S + T), rel=1e-9)
    assert adaptive["flops_moe_layers_per_token"] == pytest.approx(ffn / (S + T), rel=1e-9)
    assert adaptive["flops_breakdown"]["per_sentence"]["output_projection"] == \
        pytest.approx(T * 2 * d * V)
    # the MoE layers alone: top-2 has two experts everywhere, dense one FFN and no gate
    assert dense["flops_moe_layers_vs_ref"] == pytest.approx(
        (S + T) * 4 * d * f / ((S + T) * (8 * d * f + 2 * d * E)), rel=1e-9)
    assert dense["flops_moe_layers_vs_ref"] < dense["flops_vs_ref"] < 1
    assert top2["flops_vs_ref"] == top2["flops_moe_layers_vs_ref"] == 1.0
    assert dense["train_moe_2x_layers"] == {}


def test_paper_rows_and_protocol_column_first(compared):
    out, report = compared
    md = (out / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run | T | time"))
    assert header.index("BLEU, top-1 eval (paper)") < header.index("BLEU, training gating")
    assert "MoE-layer FLOPs vs ref" in header and "FLOPs vs ref" in header
    runs = {r["name"]: r for r in report["runs"]}
    row = next(line for line in md.splitlines() if line.startswith("| adaptive |"))
    cells = [c.strip() for c in row.split("|")]
    adaptive = runs["adaptive"]
    assert cells[8:10] == [f"{adaptive['bleu_top1']:.2f}", f"{adaptive['bleu']:.2f}"]
    for scheme, time, flops, bleu in [("dense", "0.87x", "10.6G", "40.9"),
                                      ("top2", "1.00x", "15.9G", "41.1"),
                                      ("top1", "1.04x", "10.6G", "39.5"),
                                      ("adaptive", "0.79x", "11.5G", "41.1")]:
        line = next(x for x in md.splitlines() if x.startswith(f"| paper: {scheme} (WMT19"))
        assert time in line and flops in line and bleu in line
    paper_bleu = [r["bleu"] for r in report["paper_table3_wmt19_de_en"]]
    assert paper_bleu == ["40.9", "41.1", "39.5", "41.1"]
    assert report["paper"]["task"] == "translation" and report["paper"]["inconsistencies"]


def test_complete_runs_are_reused(compared, capsys):
    out, report = compared
    before = (out / "runs" / "top2" / "result.json").read_text()
    rc = compare.main(["--data-bin", report["args"]["data_bin"], "--out", str(out),
                       "--schemes", "top2", "--max-update", "6",
                       "--validate-interval-updates", "3", "--max-tokens", "1500",
                       "--beam", "1", "--max-len-b", "8", "--threads", "1"])
    assert rc == 0
    assert "reused" in capsys.readouterr().out
    assert (out / "runs" / "top2" / "result.json").read_text() == before


def test_target_at_update_is_the_reference_loss_there(compared):
    out, report = compared
    base = ["--data-bin", report["args"]["data_bin"], "--out", str(out),
            "--schemes", "dense,top2,adaptive", "--max-update", "6",
            "--validate-interval-updates", "3", "--max-tokens", "1500",
            "--beam", "1", "--max-len-b", "8", "--threads", "1"]
    assert compare.main(base + ["--target-at-update", "3"]) == 0
    again = json.loads((out / "compare.json").read_text())
    runs = {r["name"]: r for r in again["runs"]}
    top2_at_3 = next(v["loss"] for v in runs["top2"]["valid"] if v["update"] == 3)
    assert again["target_valid_loss"] == top2_at_3
    assert runs["top2"]["to_target"]["update"] == 3
    for r in runs.values():  # the first validation at or below the target, or none
        first = next((v for v in r["valid"] if v["loss"] <= top2_at_3), None)
        assert r["to_target"] == first
    assert f"Target valid loss: {top2_at_3:.3f}" in (out / "compare.md").read_text()
    assert compare.main(base) == 0  # put the module's report back as it was


@pytest.mark.parametrize("extra, message", [
    (["--target-at-update", "50"], "--target-at-update 50: must be a multiple"),
    (["--target-at-update", "800"], "--target-at-update 800: must be a multiple"),
    (["--target-at-update", "100", "--target-valid-loss", "4"], "give one of them"),
    (["--schemes", "top3"], "unknown scheme"),
    (["--threshold", "-0.1"], "bad threshold"),
    (["--threshold", "abc"], "bad threshold"),
    (["--sweep", "0.1,x"], "bad threshold"),
])
def test_bad_input(m30k_bin, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert compare.main(["--data-bin", str(m30k_bin), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_data_bin(tmp_path, capsys):
    out = tmp_path / "out"
    assert compare.main(["--data-bin", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no data-bin" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_threshold_readings_give_one_adaptive_run_each(m30k_bin, tmp_path, capsys):
    base = ["--data-bin", str(m30k_bin), "--out", str(tmp_path / "out")]
    args = compare.parse_args(base + ["--schemes", "top2,top1,adaptive",
                                      "--threshold-probs", "softmax,renormalized"])
    runs = compare.plan_runs(args)
    assert [r[0] for r in runs] == ["top2", "top1", "adaptive-softmax", "adaptive-renormalized"]
    assert [r[4] for r in runs] == [None, None, "softmax", "renormalized"]
    flags = compare.train_flags(args, "adaptive", 0.1, tmp_path / "run", probs="renormalized")
    assert flags[flags.index("--moe-threshold-probs") + 1] == "renormalized"
    assert "--moe-threshold-probs" not in compare.train_flags(args, "top2", None, tmp_path / "r")
    assert compare.gating_value({"threshold": 0.1, "threshold_probs": "renormalized"}) == \
        "0.1 (renormalized)"
    # one reading: the usual run names, the reading passed on
    args = compare.parse_args(base + ["--schemes", "adaptive", "--threshold-probs", "renormalized"])
    assert compare.plan_runs(args) == [("adaptive", "adaptive", 0.1, None, "renormalized")]
    assert compare.main(base + ["--threshold-probs", "softmax,norm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--threshold-probs 'norm'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_gpu_flag_trains_fp16_and_generates_off_cpu(m30k_bin, tmp_path):
    args = compare.parse_args(["--data-bin", str(m30k_bin), "--out", str(tmp_path), "--gpu"])
    compare.resolve_kind(args)
    flags = compare.train_flags(args, "adaptive", 0.1, tmp_path / "run")
    assert "--fp16" in flags and "--cpu" not in flags
    assert "--cpu" not in compare.generate_argv(args, tmp_path / "c.pt", "top1")
    args.gpu = False
    assert "--cpu" in compare.train_flags(args, "adaptive", 0.1, tmp_path / "run")
    assert "--cpu" in compare.generate_argv(args, tmp_path / "c.pt", "top1")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_without_cuda_is_one_line(m30k_bin, tmp_path, capsys):
    out = tmp_path / "out"
    assert compare.main(["--data-bin", str(m30k_bin), "--out", str(out), "--gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_seeds_run_each_scheme_per_seed_and_summarize(m30k_bin, tmp_path):
    out = tmp_path / "out"
    # dense and top1: the cheapest pair (one generation each) exercises the per-seed reference
    rc = compare.main(["--data-bin", str(m30k_bin), "--out", str(out), "--schemes", "dense,top1",
                       "--seeds", "3,4", "--max-update", "4", "--validate-interval-updates", "2",
                       "--max-tokens", "1500", "--beam", "1", "--max-len-b", "8", "--threads", "1"])
    assert rc == 0
    report = json.loads((out / "compare.json").read_text())
    runs = report["runs"]
    assert [r["name"] for r in runs] == ["dense-s3", "top1-s3", "dense-s4", "top1-s4"]
    assert report["reference"] == "dense"  # no top2 or adaptive run: the first scheme
    for r in runs:
        assert f"--seed {r['seed']}" in r["command"] and r["base"] == r["name"].rsplit("-s", 1)[0]
        ref = next(x for x in runs if x["base"] == "dense" and x["seed"] == r["seed"])
        assert r["time_vs_ref"] == pytest.approx(r["train_wall_s"] / ref["train_wall_s"])
    md = (out / "compare.md").read_text()
    assert "Mean ± sd over seeds 3, 4" in md
    row = next(line for line in md.splitlines() if line.startswith("| dense | "))
    assert "1.00 ± 0.00" in row  # the reference against itself, seed by seed


@pytest.mark.parametrize("seeds", ["1,x", "2,2", ","])
def test_bad_seeds(m30k_bin, tmp_path, capsys, seeds):
    out = tmp_path / "out"
    assert compare.main(["--data-bin", str(m30k_bin), "--out", str(out), "--seeds", seeds]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seeds" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_share_over_training_is_read_from_the_log_and_tabled(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("\n".join(
        f'2026-01-01 00:00:00 | INFO | train_inner | {{"num_updates": "{u}", "moe_2x": "{s}"}}'
        for u, s in ((10, 0.9), (20, 0.7), (30, 0.5))) + "\n")
    curve = compare.share_curve(log)
    assert curve == [{"update": 10, "share": 0.9}, {"update": 20, "share": 0.7},
                     {"update": 30, "share": 0.5}]
    runs = [{"name": "adaptive", "scheme": "adaptive", "train_moe_2x_curve": curve},
            {"name": "top2", "scheme": "top2", "train_moe_2x_curve": [{"update": 10, "share": 1}]}]
    lines = compare.curve_lines(runs, points=2)
    assert "| run | @10 | @30 |" in lines  # at most 2 columns, the last update kept
    assert "| adaptive | 0.900 | 0.500 |" in lines
    assert not any(line.startswith("| top2") for line in lines)
    assert compare.curve_lines(runs[1:]) == []
