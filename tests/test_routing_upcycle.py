"""adaptive-moe-routing and adaptive-moe-upcycle (cli) and their libraries (tools.routing,
tools.upcycle) on tiny checkpoints trained here on real data (CPU)."""

import argparse
import copy
import json
import re
from collections import Counter

import pytest
import torch

import fairseq_adaptive_moe  # noqa: F401  (what --user-dir does: registers, allows checkpoints)
from conftest import TINY_TRANSLATION, USER_DIR, run_cli
from fairseq_adaptive_moe.cli import routing as routing_cli
from fairseq_adaptive_moe.cli import upcycle as upcycle_cli
from fairseq_adaptive_moe.tools import routing, upcycle
from fairseq_adaptive_moe.moe import MoELayer

COMMON = TINY_TRANSLATION
SPLIT, BATCH = "test", 16


def load(path, data, **overrides):
    from fairseq import checkpoint_utils

    (model,), cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": str(data), **overrides})
    return model.eval(), cfg, task


def batches(task, model, split=SPLIT, max_sentences=BATCH):
    from fairseq import utils

    task.load_dataset(split)
    return task.get_batch_iterator(
        dataset=task.dataset(split), max_sentences=max_sentences, ignore_invalid_inputs=True,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        seed=1).next_epoch_itr(shuffle=False)


@pytest.fixture(scope="module")
def moe_ckpt(tiny_moe_run):
    return tiny_moe_run / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def dense_ckpt(tiny_dense_run):
    return tiny_dense_run / "checkpoint_last.pt"


# ---- adaptive-moe-routing ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def report(moe_ckpt, m30k_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("routing") / "report"
    proc = run_cli("adaptive-moe-routing", m30k_bin, "--path", moe_ckpt, "--gen-subset", SPLIT,
                   "--max-sentences", BATCH, "--out", out, "--cpu", "--moe-eval-gating", "train")
    assert re.search(r"adaptive-moe-routing test: +100%.*4/4", proc.stderr)  # the progress bar
    return out, json.loads((out / "summary.json").read_text())


def gate_oracle(moe_ckpt, m30k_bin):
    """Per layer: tokens, two-expert tokens and expert load, from each gate's own input with the
    paper's rule written out here (two experts iff p1 - p2 <= T), over the tool's batches."""
    model, _, task = load(moe_ckpt, m30k_bin, moe_eval_gating="train")
    counts = {}

    def hook(name):
        def record(gate, inputs, _output):
            x, mask = inputs
            probs = torch.softmax(x.float() @ gate.wg.weight.float().t(), dim=-1)
            top_p, top_i = probs.topk(2, dim=-1)
            two = (top_p[:, 0] - top_p[:, 1] <= gate.threshold) & mask
            c = counts.setdefault(name, dict(tokens=0, two=0,
                                             load=torch.zeros(gate.num_experts, dtype=torch.long)))
            c["tokens"] += int(mask.sum())
            c["two"] += int(two.sum())
            c["load"] += torch.bincount(top_i[mask, 0], minlength=gate.num_experts)
            c["load"] += torch.bincount(top_i[two, 1], minlength=gate.num_experts)
        return record

    for module in model.modules():
        if isinstance(module, MoELayer):
            module.gate.register_forward_hook(hook(module.name))
    with torch.no_grad():
        for sample in batches(task, model):
            model(**sample["net_input"])
    return counts, task


def test_summary_matches_routing_computed_directly(report, moe_ckpt, m30k_bin):
    _, summary = report
    oracle, task = gate_oracle(moe_ckpt, m30k_bin)
    names = [e["name"] for e in summary["layers"]]
    assert names == ["encoder.0", "encoder.1", "decoder.0", "decoder.1"]
    for e in summary["layers"]:
        o = oracle[e["name"]]
        assert (e["tokens"], e["two_expert_tokens"]) == (o["tokens"], o["two"]), e["name"]
        assert e["expert_load"] == o["load"].tolist()
        assert e["two_expert_fraction"] == pytest.approx(o["two"] / o["tokens"])
        assert e["experts_per_token_histogram"] == [0, o["tokens"] - o["two"], o["two"]]
    assert 0 < summary["overall"]["two_expert_tokens"] < summary["overall"]["tokens"]
    # every non-padding token of the split, once per layer
    ds = task.dataset(SPLIT)
    assert summary["sentences"] == summary["sentences_in_split"] == len(ds)
    src_tokens = sum(int(n) for n in ds.src_sizes)
    tgt_tokens = sum(int(n) for n in ds.tgt_sizes)
    assert summary["sides"]["encoder"]["tokens"] == 2 * src_tokens
    assert summary["sides"]["decoder"]["tokens"] == 2 * tgt_tokens
    assert summary["gating"]["policy"] == "adaptive"


def test_token_records_use_original_ids_and_positions(report, moe_ckpt, m30k_bin):
    out, summary = report
    _, _, task = load(moe_ckpt, m30k_bin)
    task.load_dataset(SPLIT)
    ds, d = task.dataset(SPLIT), task.source_dictionary
    records = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert len(records) == summary["token_records"] == summary["overall"]["tokens"]
    assert len({(r["id"], r["layer"], r["pos"]) for r in records}) == len(records)
    per_layer = Counter(r["layer"] for r in records)
    assert per_layer == {e["name"]: e["tokens"] for e in summary["layers"]}
    for r in records:
        item = ds[r["id"]]
        if r["layer"].startswith("encoder"):
            assert r["token"] == d[item["source"][r["pos"]]]
        else:  # decoder input: </s>, then the target shifted by one
            assert r["token"] == ("</s>" if r["pos"] == 0 else d[item["target"][r["pos"] - 1]])
            assert r["target"] == d[item["target"][r["pos"]]]
        assert len(r["probs"]) == 4 and abs(sum(r["probs"]) - 1) < 1e-3
        assert 1 <= len(r["experts"]) <= 2
        assert r["experts"][0] == max(range(4), key=lambda e: r["probs"][e])
    # the word list counts every (word occurrence, layer) once
    for side, rows in summary["top_tokens"].items():
        assert rows and all(0 < r["two_expert"] <= r["occurrences"] for r in rows)
        assert sum(r["two_expert"] for r in rows) <= summary["sides"][side]["two_expert_tokens"]


def test_plots_and_report_exist(report):
    out, summary = report
    for name in ("two_expert_by_layer.png", "topk_profiles.png", "expert_load.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    text = (out / "report.md").read_text()
    for name in routing.OUTPUT_FILES:
        if name != "report.md":
            assert f"({name})" in text
    for e in summary["layers"]:
        assert f"| {e['name']} | {e['tokens']} | {e['two_expert_tokens']} |" in text
    assert summary["sampled_sentences"]


@pytest.mark.parametrize("gating,fraction", [(None, 0.0), ("top1", 0.0), ("top2", 1.0)])
def test_eval_gating_override(moe_ckpt, m30k_bin, tmp_path, gating, fraction):
    """No flag: the checkpoint's saved --moe-eval-gating, top1 by default (the paper's)."""
    out = tmp_path / str(gating)
    flag = [] if gating is None else ["--moe-eval-gating", gating]
    rc = routing_cli.main([str(m30k_bin), "--path", str(moe_ckpt), "--gen-subset", "valid", "--out",
                           str(out), *flag, "--cpu", "--no-progress-bar"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gating"]["policy"] == (gating or "top1")
    assert summary["gating"]["train_gating"] == "adaptive"
    assert all(e["two_expert_fraction"] == fraction for e in summary["layers"])
    note = "`--moe-eval-gating train` shows the routing the model was trained with"
    assert (note in (out / "report.md").read_text()) == (gating != "top2")


def test_group_words():
    assert routing.group_words(["\u2581Ein", "\u2581Mann", "es", ".", "</s>"], "sentencepiece") == (
        [0, 1, 1, 1, 2], ["Ein", "Mannes.", "</s>"])
    assert routing.group_words(["a@@", "b", "c", "</s>"], "subword_nmt") == (
        [0, 0, 1, 2], ["ab", "c", "</s>"])
    assert routing.group_words(["\u2581a", "b"], "none") == ([0, 1], ["\u2581a", "b"])


def test_plot_labels_are_the_log_key_suffixes():
    """One short_name for the training log's keys (moe_2x_enc0 ...) and the report's labels."""
    from fairseq_adaptive_moe.criterions import moe_logging

    assert routing.short_name is moe_logging.short_name
    assert [routing.short_name(n) for n in ("encoder.0", "decoder.11")] == ["enc0", "dec11"]


def test_routing_library_raises_instead_of_exiting(moe_ckpt, m30k_bin, tmp_path):
    options = routing.RoutingOptions(data=str(m30k_bin), path=str(tmp_path / "nope.pt"),
                                     out=str(tmp_path / "out"))
    with pytest.raises(routing.InputError, match="checkpoint not found"):
        routing.analyse(options)
    with pytest.raises(routing.InputError, match="--max-tokens must be >= 1"):
        routing.analyse(routing.RoutingOptions(str(m30k_bin), str(moe_ckpt), str(tmp_path / "o"),
                                               max_tokens=0))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["missing", "dense", "split"])
def test_routing_bad_input_one_line_exit_2(case, moe_ckpt, dense_ckpt, m30k_bin, tmp_path, capsys):
    path = {"missing": tmp_path / "nope.pt", "dense": dense_ckpt, "split": moe_ckpt}[case]
    split = "nosuch" if case == "split" else "valid"
    out = tmp_path / "out"
    rc = routing_cli.main([str(m30k_bin), "--path", str(path), "--gen-subset", split, "--out", str(out),
                       "--cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert rc == 2 and len(err) == 1, err
    expected = {"missing": "not found", "dense": "no MoE layers", "split": "'nosuch' not found"}
    assert expected[case] in err[0]
    assert not out.exists()


# ---- adaptive-moe-upcycle ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def upcycled(dense_ckpt, m30k_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("up") / "upcycled.pt"
    proc = run_cli("adaptive-moe-upcycle", dense_ckpt, "--out", out, "--moe-expert-count", "4",
                   "--data", m30k_bin)
    assert "--restore-file" in proc.stdout
    return out


def test_upcycled_checkpoint_config_and_experts(upcycled, dense_ckpt):
    state = torch.load(upcycled, map_location="cpu")
    dense = torch.load(dense_ckpt, map_location="cpu")
    model_cfg = state["cfg"]["model"]
    assert model_cfg.arch == model_cfg._name == "adaptive_moe_transformer"
    assert (model_cfg.moe_expert_count, model_cfg.moe_freq) == (4, 1)
    assert model_cfg.moe_combine_weights == "renormalized"
    assert model_cfg.encoder_ffn_embed_dim == dense["cfg"]["model"].encoder_ffn_embed_dim == 64
    assert "last_optimizer_state" not in state
    for side in ("encoder", "decoder"):
        for i in range(2):
            pre = f"{side}.layers.{i}"
            w1 = state["model"][f"{pre}.moe.experts.fc1_weight"]
            assert w1.shape == (4, 64, 64)
            for e in range(4):
                assert torch.equal(w1[e], dense["model"][f"{pre}.fc1.weight"].t())
                assert torch.equal(state["model"][f"{pre}.moe.experts.fc2_bias"][e],
                                   dense["model"][f"{pre}.fc2.bias"])
            assert f"{pre}.fc1.weight" not in state["model"]
    shared = [k for k in dense["model"] if ".fc1." not in k and ".fc2." not in k]
    assert shared and all(torch.equal(state["model"][k], dense["model"][k]) for k in shared)


@pytest.mark.parametrize("gating", ["train", "top2", "top1"])
def test_upcycled_reproduces_dense_outputs(upcycled, dense_ckpt, m30k_bin, gating):
    dense, _, task = load(dense_ckpt, m30k_bin)
    moe, _, _ = load(upcycled, m30k_bin, moe_eval_gating=gating)
    policy = moe.encoder.layers[0].moe.gate.active_policy()
    assert policy == ("adaptive" if gating == "train" else gating)
    multi = 0
    with torch.no_grad():
        for sample in list(batches(task, dense, "valid"))[:2]:
            expected, _ = dense(**sample["net_input"])
            got, extra = moe(**sample["net_input"])
            keep = sample["target"].ne(task.target_dictionary.pad())
            torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
            multi += sum(int(s.num_multi) for s in extra["moe_stats"])
    if gating != "top1":
        assert multi > 0  # two experts were really combined


def test_restore_conversion_and_upcycle_give_the_same_experts(upcycled, dense_ckpt, m30k_bin):
    """One conversion serves both roads from a dense FFN to experts: the state-dict conversion
    that --restore-file of a dense checkpoint runs (adaptive_moe_bart's upgrade_state_dict_named)
    and adaptive-moe-upcycle give the same experts and the same shared weights."""
    from fairseq import checkpoint_utils, tasks

    from fairseq_adaptive_moe.models.dense_to_moe import dense_ffn_to_experts, moe_layers

    state = checkpoint_utils.load_checkpoint_to_cpu(str(dense_ckpt), {"data": str(m30k_bin)})
    options = upcycle.moe_options(moe_expert_count=4, moe_combine_weights="renormalized")
    args = upcycle.moe_model_args(state["cfg"].model, options)
    model = tasks.setup_task(state["cfg"].task).build_model(args)
    converted_state = dict(state["model"])
    assert dense_ffn_to_experts(model, converted_state) == [
        "encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1"]
    model.load_state_dict(converted_state, strict=True)
    upcycled_state = torch.load(upcycled, map_location="cpu")["model"]
    assert set(upcycled_state) == set(model.state_dict())
    for key, value in model.state_dict().items():
        if ".moe.gate." not in key:  # gates: each keeps its own model's init
            assert torch.equal(value, upcycled_state[key]), key
    names = [name for name, _ in moe_layers(model)]
    record = torch.load(upcycled, map_location="cpu")["extra_state"]["upcycle"]
    assert record["moe_layers"] == names == [f"{n}.moe" for n in (
        "encoder.layers.0", "encoder.layers.1", "decoder.layers.0", "decoder.layers.1")]


def test_upcycle_library_raises_instead_of_exiting(dense_ckpt, tmp_path):
    options = upcycle.moe_options(moe_expert_count=4)
    with pytest.raises(upcycle.UpcycleError, match="--noise-std must be >= 0"):
        upcycle.upcycle_checkpoint(str(dense_ckpt), str(tmp_path / "o.pt"), options, noise_std=-1)
    with pytest.raises(upcycle.UpcycleError, match="unknown MoE options"):
        upcycle.moe_options(moe_experts=4)
    bad = copy.deepcopy(options)
    bad["moe_expert_count"] = 0
    with pytest.raises(upcycle.UpcycleError, match="--moe-expert-count must be >= 1"):
        upcycle.upcycle_checkpoint(str(dense_ckpt), str(tmp_path / "o.pt"), bad)
    assert not list(tmp_path.iterdir())


def test_noise_freq_and_gate_init(dense_ckpt, m30k_bin, tmp_path):
    out = tmp_path / "noisy.pt"
    rc = upcycle_cli.main([str(dense_ckpt), "-o", str(out), "--moe-expert-count", "3", "--moe-freq", "2",
                       "--noise-std", "0.01", "--gate-init-std", "0", "--data", str(m30k_bin)])
    assert rc == 0
    state = torch.load(out, map_location="cpu")["model"]
    dense = torch.load(dense_ckpt, map_location="cpu")["model"]
    assert "encoder.layers.0.fc1.weight" in state and "encoder.layers.0.moe.gate.wg.weight" not in state
    w = state["encoder.layers.1.moe.experts.fc1_weight"]
    ref = dense["encoder.layers.1.fc1.weight"].t()
    rel = [float((w[e] - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()) for e in range(3)]
    assert all(0.007 < r < 0.013 for r in rel), rel
    assert not torch.equal(w[0], w[1])
    assert torch.count_nonzero(state["decoder.layers.1.moe.gate.wg.weight"]) == 0
    rc = upcycle_cli.main([str(dense_ckpt), "-o", str(tmp_path / "again.pt"), "--moe-expert-count", "3",
                       "--moe-freq", "2", "--noise-std", "0.01", "--gate-init-std", "0",
                       "--data", str(m30k_bin)])
    assert rc == 0  # seeded: the same noise
    again = torch.load(tmp_path / "again.pt")["model"]
    assert torch.equal(again["encoder.layers.1.moe.experts.fc1_weight"], w)


def test_upcycled_trains_on_with_restore_file(upcycled, m30k_bin, tmp_path):
    flags = torch.load(upcycled, map_location="cpu")["extra_state"]["upcycle"]["train_flags"]
    assert flags[:2] == ["--arch", "adaptive_moe_transformer"] and "--moe-expert-count" in flags
    proc = run_cli("fairseq-train", m30k_bin, *COMMON, *flags,
                   "--criterion", "adaptive_moe_label_smoothed_cross_entropy",
                   "--restore-file", upcycled, "--reset-optimizer", "--max-update", "2",
                   "--save-dir", tmp_path / "ft", "--no-save")
    log = proc.stdout + proc.stderr
    assert "Loaded checkpoint" in log and "@ 0 updates" in log
    inner = [json.loads(line.split("| train_inner | ", 1)[1]) for line in log.splitlines()
             if "| train_inner | " in line]
    assert [int(r["num_updates"]) for r in inner] == [1, 2]
    assert "moe_2x_enc0" in inner[-1]


def _rewrite_arch(src, dst, arch):
    state = torch.load(src, map_location="cpu")
    state["cfg"]["model"].arch = state["cfg"]["model"]._name = arch
    torch.save(state, dst)
    return dst


@pytest.mark.parametrize("case,flags,message", [
    ("count0", ["--moe-expert-count", "0"], "--moe-expert-count must be >= 1"),
    ("max_experts", ["--moe-expert-count", "4", "--moe-max-experts", "5"],
     "--moe-max-experts must be between 1 and the expert count (4)"),
    ("freq", ["--moe-expert-count", "4", "--moe-freq", "-1"], "--moe-freq must be >= 0"),
    ("noise", ["--moe-expert-count", "4", "--noise-std", "-1"], "--noise-std must be >= 0"),
    ("exists", ["--moe-expert-count", "4"], "exists; pass --force"),
    ("missing", ["--moe-expert-count", "4"], "dense checkpoint not found"),
    ("moe", ["--moe-expert-count", "4"], "already an MoE checkpoint"),
    ("lm", ["--moe-expert-count", "4"], "unsupported architecture 'transformer_lm'"),
    ("lstm", ["--moe-expert-count", "4"], "unsupported architecture 'lstm'"),
])
def test_upcycle_errors_one_line_exit_2(case, flags, message, dense_ckpt, moe_ckpt, m30k_bin,
                                        tmp_path, capsys):
    if case in ("lm", "lstm"):  # a real checkpoint whose config names another model (BART
        # checkpoints upcycle: tests/test_bart.py)
        src = _rewrite_arch(dense_ckpt, tmp_path / f"{case}.pt", "transformer_lm" if case == "lm" else case)
    else:
        src = {"missing": tmp_path / "nope.pt", "moe": moe_ckpt}.get(case, dense_ckpt)
    out = tmp_path / "out.pt"
    if case == "exists":
        out.write_text("keep me")
    rc = upcycle_cli.main([str(src), "-o", str(out), "--data", str(m30k_bin), *flags])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert err[0].startswith("adaptive-moe-upcycle: error: ")
    assert out.read_text() == "keep me" if case == "exists" else not out.exists()


def test_upcycle_requires_expert_count(dense_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        upcycle_cli.main([str(dense_ckpt), "-o", str(tmp_path / "x.pt")])
    assert info.value.code == 2 and "--moe-expert-count" in capsys.readouterr().err


def test_console_scripts_are_installed():
    assert isinstance(routing_cli.build_parser(), argparse.ArgumentParser)
    for tool in ("adaptive-moe-routing", "adaptive-moe-upcycle"):
        assert "usage:" in run_cli(tool, "--help").stdout
