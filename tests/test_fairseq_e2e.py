"""The plugin through fairseq's own command-line tools, on a slice of real data (CPU)."""

import json

import pytest
import torch

import fairseq_adaptive_moe  # noqa: F401  (what --user-dir does: registers, allows checkpoints)
from conftest import MOE_TINY, TINY_TRANSLATION, USER_DIR, load_script, run_cli

TRAIN = [*TINY_TRANSLATION, *MOE_TINY]


def json_records(text, kind="train_inner"):
    return [json.loads(line.split(f"| {kind} | ", 1)[1]) for line in text.splitlines()
            if f"| {kind} | " in line]


def train(data, save_dir, *extra):
    proc = run_cli("fairseq-train", data, *TRAIN, "--save-dir", save_dir, *extra)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tiny_moe_run):
    """(save dir, training log) of the shared 6-update run of TRAIN."""
    return tiny_moe_run, (tiny_moe_run / "train.log").read_text()


def test_train_logs_moe_metrics_per_layer(trained):
    _, log = trained
    records = json_records(log)
    assert [int(r["num_updates"]) for r in records] == list(range(1, 7))
    for r in records:
        for key in ("moe_2x", "moe_2x_enc0", "moe_2x_enc1", "moe_2x_dec0", "moe_2x_dec1"):
            assert 0.0 <= float(r[key]) <= 1.0
        assert 1.0 <= float(r["moe_ept"]) <= 2.0
        assert float(r["moe_imbalance"]) >= 1.0
        assert float(r["moe_loss"]) > 0
    valid = json_records(log, "valid")
    assert valid and "valid_moe_2x" in valid[-1]


def test_resume_from_checkpoint_last(trained, m30k_bin, tmp_path):
    save, _ = trained
    import shutil
    resumed = tmp_path / "resumed"
    shutil.copytree(save, resumed)
    log = train(m30k_bin, resumed, "--max-update", "9")
    assert "Loaded checkpoint" in log and "@ 6 updates" in log
    assert [int(r["num_updates"]) for r in json_records(log)] == [7, 8, 9]


def test_generate_top1_by_default_and_as_trained_with_override(trained, m30k_bin, tmp_path):
    save, _ = trained
    score = load_script("examples/translation/score.py")
    common = [m30k_bin, "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
              "--gen-subset", "test", "--cpu", "--beam", "2", "--max-len-b", "20",
              "--post-process", "sentencepiece"]
    for name, extra in (("top1", []), ("train", ["--model-overrides", "{'moe_eval_gating': 'train'}"])):
        proc = run_cli("fairseq-generate", *common, *extra)
        assert "BLEU4" in proc.stdout
        out = tmp_path / f"gen-{name}.txt"
        out.write_text(proc.stdout)
        assert score.main([str(out), str(m30k_bin / "raw" / "test.en")]) == 0


def test_interactive_loads_the_checkpoint(trained, m30k_bin):
    save, _ = trained
    source = "▁Ein ▁Mann ▁mit ▁einem ▁Hut .\n▁Zwei ▁Hunde .\n"
    proc = run_cli("fairseq-interactive", m30k_bin, "--user-dir", USER_DIR,
                   "--path", save / "checkpoint_last.pt", "--cpu", "--beam", "2",
                   "--source-lang", "de", "--target-lang", "en", "--max-len-b", "10",
                   input=source)
    assert len([line for line in proc.stdout.splitlines() if line.startswith("H-")]) == 2


def test_model_overrides_switch_eval_gating(trained, m30k_bin):
    """Saved default top1 at inference; --model-overrides 'train' routes as trained (adaptive)."""
    from fairseq import checkpoint_utils
    save, _ = trained
    for override, policy in ((None, "top1"), ("train", "train"), ("top1", "top1")):
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(save / "checkpoint_last.pt")],
            arg_overrides={} if override is None else {"moe_eval_gating": override})
        model = models[0].eval()
        assert model.encoder.layers[0].moe.gate.eval_policy == policy
        task.load_dataset("valid")
        batch = next(iter(task.get_batch_iterator(task.dataset("valid"), max_tokens=500).next_epoch_itr()))
        with torch.no_grad():
            _, extra = model(**batch["net_input"])
        assert len(extra["moe_stats"]) == 4
        multi = [s.num_multi.item() for s in extra["moe_stats"]]
        assert all(m > 0 for m in multi) if policy == "train" else set(multi) == {0}, (policy, multi)
        model.train()
        with torch.no_grad():
            _, extra = model(**batch["net_input"])
        assert sum(s.num_multi.item() for s in extra["moe_stats"]) > 0  # training gating: adaptive


@pytest.mark.parametrize("flags,named", [
    (["--moe-threshold", "-0.1"], "--moe-threshold"),
    (["--moe-gating", "top3"], "--moe-gating"),
    (["--moe-max-experts", "5"], "--moe-max-experts"),
    (["--moe-freq", "-1"], "--moe-freq"),
    (["--moe-capacity-factor", "-2"], "--moe-capacity-factor"),
    (["--moe-balance-loss-weight", "-1"], "--moe-balance-loss-weight"),
])
def test_bad_flags_fail_cleanly_and_write_nothing(m30k_bin, tmp_path, flags, named):
    save = tmp_path / "never"
    proc = run_cli("fairseq-train", m30k_bin, *TRAIN, "--save-dir", save, "--max-update", "1",
                   *flags, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and named in errors[0], proc.stderr[-2000:]
    assert not save.exists()


@pytest.mark.slow
def test_flags_have_help_text():
    proc = run_cli("fairseq-train", "--user-dir", USER_DIR, "--arch", "adaptive_moe_transformer",
                   "--criterion", "adaptive_moe_label_smoothed_cross_entropy", "--help")
    text = " ".join(proc.stdout.split())
    for flag in ("--moe-gating", "--moe-threshold", "--moe-max-experts", "--moe-expert-count",
                 "--moe-freq", "--moe-capacity-factor", "--moe-eval-gating",
                 "--moe-balance-loss-weight", "--moe-z-loss-weight", "--moe-expert-parallel-size",
                 "--moe-balance-tokens", "--moe-init-from-dense", "--no-moe-valid-top1"):
        assert flag in text
    assert "p1 - p2 <= --moe-threshold" in text


def _nll_per_update(m30k_bin, save_dir, *flags):
    log = train(m30k_bin, save_dir, "--max-update", "8", "--moe-balance-loss-weight", "0",
                "--no-save", "--disable-validation", *flags)
    return [r["nll_loss"] for r in json_records(log)]


def test_threshold_extremes_route_as_top1_and_top2(m30k_bin, tmp_path):
    # top2 combines renormalised by default (GShard), adaptive with softmax weights: the same
    # combine weights are stated for T = 1
    top2 = _nll_per_update(m30k_bin, tmp_path / "a", "--moe-gating", "top2")
    t1 = _nll_per_update(m30k_bin, tmp_path / "b", "--moe-gating", "adaptive", "--moe-threshold", "1.0",
                         "--moe-combine-weights", "renormalized")
    assert len(top2) == 8 and top2 == t1
    top1 = _nll_per_update(m30k_bin, tmp_path / "c", "--moe-gating", "top1")
    t0 = _nll_per_update(m30k_bin, tmp_path / "d", "--moe-gating", "adaptive", "--moe-threshold", "0")
    assert len(top1) == 8 and top1 == t0
    assert top1 != top2  # the comparison can fail: the two gatings do train differently


def test_fp16_training_through_fairseq(trained, m30k_bin, tmp_path):
    """fairseq's --fp16 (half model, FP16Optimizer with loss scaling) trains through the plugin:
    the gate, the experts, the balance loss and the MoE logs in fp16. On CPU fairseq needs
    --fp16-no-flatten-grads (its flat fp32 copy is CUDA-only). The first update's loss, before
    any step, matches the fp32 run with the same seed."""
    log = train(m30k_bin, tmp_path / "fp16", "--max-update", "6", "--no-save", "--fp16",
                "--fp16-no-flatten-grads")
    records = json_records(log)
    assert [int(r["num_updates"]) for r in records] == list(range(1, 7))
    for r in records:
        assert "loss_scale" in r and torch.isfinite(torch.tensor(float(r["loss"])))
        assert 0.0 < float(r["moe_2x"]) <= 1.0 and float(r["moe_loss"]) > 0
    assert float(records[-1]["loss"]) < float(records[0]["loss"])
    fp32_first = float(json_records(trained[1])[0]["loss"])
    assert abs(float(records[0]["loss"]) - fp32_first) <= 2e-3 * fp32_first  # seen: 1e-4


def test_dense_baseline_same_code_path(m30k_bin, tmp_path):
    log = train(m30k_bin, tmp_path / "dense", "--max-update", "2", "--moe-freq", "0", "--no-save")
    records = json_records(log)
    assert len(records) == 2 and "moe_2x" not in records[-1]
    every_other = train(m30k_bin, tmp_path / "f2", "--max-update", "1", "--moe-freq", "2", "--no-save")
    keys = json_records(every_other)[-1]
    assert "moe_2x_enc1" in keys and "moe_2x_enc0" not in keys


def test_incremental_decoding_matches_full_decoding(trained, monkeypatch):
    """Beam search decodes one position at a time; the MoE decoder must agree with the
    teacher-forced pass position by position (adaptive routing is per token). The steps run the
    small-call path (fc1's bias added, groups not padded), the full pass the many-rows one (bias
    folded): the outputs agree across the two paths."""
    from fairseq import checkpoint_utils
    from fairseq_adaptive_moe.moe import ExpertFFN
    calls = []  # (rows, bias folded, groups padded) of every expert call
    folds, pads = ExpertFFN.folds_bias, ExpertFFN.padded_capacity
    monkeypatch.setattr(ExpertFFN, "folds_bias",
                        lambda self, n: calls.append(("fold", n, folds(self, n))) or calls[-1][2])
    monkeypatch.setattr(ExpertFFN, "padded_capacity", lambda self, rows, plan: calls.append(
        ("pad", rows.shape[0], pads(self, rows, plan))) or calls[-1][2])
    save, _ = trained
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(save / "checkpoint_last.pt")])
    model = models[0].eval()
    task.load_dataset("valid")
    batch = next(iter(task.get_batch_iterator(task.dataset("valid"), max_tokens=300).next_epoch_itr()))
    net_input = batch["net_input"]
    with torch.no_grad():
        full, _ = model(**net_input)
        full_calls, calls[:] = list(calls), []
        encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
        state = {}
        steps = []
        prev = net_input["prev_output_tokens"]
        for t in range(prev.size(1)):
            out, _ = model.decoder(prev[:, : t + 1], encoder_out=encoder_out, incremental_state=state)
            steps.append(out)
    incremental = torch.cat(steps, dim=1)
    keep = prev.ne(task.target_dictionary.pad())  # padded positions differ by construction
    assert torch.allclose(full[keep], incremental[keep], atol=1e-4)
    step_rows = prev.size(0)  # a decoder step: one row per sentence
    assert any(kind == "fold" and n > step_rows and taken for kind, n, taken in full_calls)
    decoder_steps = [(kind, taken) for kind, n, taken in calls if n <= step_rows]
    assert decoder_steps and not any(taken for kind, taken in decoder_steps if kind == "fold")
    assert not any(taken is not None for kind, taken in decoder_steps if kind == "pad")


def test_small_call_path_gives_the_same_hypotheses(trained, monkeypatch):
    """Beam search with fc1's bias added (the path for a few rows: a decoding step) gives the
    hypotheses that folding it into the GEMM (the path for many rows) gives, sentence by
    sentence, on the test set, under top-1 and adaptive inference."""
    from fairseq import checkpoint_utils
    from fairseq.sequence_generator import SequenceGenerator
    from fairseq_adaptive_moe.moe import ExpertFFN

    save, _ = trained
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(save / "checkpoint_last.pt")])
    model = models[0].eval()
    task.load_dataset("test")
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=5, max_len_b=20)

    def hypotheses(eval_gating):
        for gate in model.modules():
            if hasattr(gate, "eval_policy"):
                gate.eval_policy = eval_gating
        out = {}
        itr = task.get_batch_iterator(task.dataset("test"), max_tokens=600).next_epoch_itr()
        with torch.no_grad():
            for batch in itr:
                for i, hyps in zip(batch["id"].tolist(), generator.generate([model], batch)):
                    out[i] = hyps[0]["tokens"].tolist()
        return out

    for eval_gating in ("top1", "train"):
        monkeypatch.setattr(ExpertFFN, "fold_rows_divisor", 10**9)  # always folded
        folded = hypotheses(eval_gating)
        monkeypatch.setattr(ExpertFFN, "fold_rows_divisor", 0)  # never folded
        added = hypotheses(eval_gating)
        assert len(folded) == 60 and folded == added, eval_gating


@pytest.mark.parametrize("gating, flag, expected", [
    ("adaptive", "auto", "single"), ("top1", "auto", "single"), ("top2", "auto", "first"),
    ("top2", "single", "single"), ("adaptive", "first", "first"),
])
def test_balance_tokens_auto_gives_top2_a_balance_loss(gating, flag, expected):
    """--moe-balance-tokens auto (the default): top-2 has no single-expert token, so it uses
    GShard's 'first'; every other gating the paper's 'single'."""
    from argparse import Namespace

    import torch

    from fairseq_adaptive_moe.models.config import MOE_DEFAULTS
    from fairseq_adaptive_moe.models.layers import build_moe_layer

    assert MOE_DEFAULTS["moe_balance_tokens"] == "auto"
    cfg = Namespace(**{**MOE_DEFAULTS, "moe_gating": gating, "moe_balance_tokens": flag,
                       "moe_expert_count": 4})
    layer = build_moe_layer(cfg, 8, 16, "encoder.0")
    assert layer.balance_tokens == expected
    _, stats = layer(torch.randn(32, 8))
    assert (stats.balance_loss.item() > 0) == (expected == "first" or gating != "top2")


def test_torch_adamw_optimizer_matches_fairseqs_adam(m30k_bin, tmp_path):
    """--optimizer torch_adamw takes fairseq adam's flags and gives its update: from the same
    start, three updates give the same losses and nearly all weights agree to a tenth of one
    step (weights with gradients near eps differ: torch adds eps after the bias correction,
    fairseq before it); it resumes."""
    runs, losses = {}, {}
    for name in ("adam", "torch_adamw"):
        save = tmp_path / name
        flags = [f if f != "adam" else name for f in TRAIN]  # --optimizer NAME
        proc = run_cli("fairseq-train", m30k_bin, *flags, "--save-dir", save, "--max-update", "3",
                       "--weight-decay", "0.01", "--adam-betas", "(0.9, 0.98)")
        runs[name] = torch.load(save / "checkpoint_last.pt", weights_only=False)
        losses[name] = [float(r["loss"]) for r in json_records(proc.stdout + proc.stderr)]
    group = runs["torch_adamw"]["last_optimizer_state"]["param_groups"][0]
    assert group.get("fused") or group.get("foreach")  # torch's AdamW, fused on this CPU torch
    assert group["weight_decay"] == 0.01 and tuple(group["betas"]) == (0.9, 0.98)
    assert len(losses["adam"]) == 3
    assert losses["adam"] == pytest.approx(losses["torch_adamw"], abs=0.02)
    a, b = runs["adam"]["model"], runs["torch_adamw"]["model"]
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert (diff > 1e-4).float().mean() < 0.01, (diff > 1e-4).float().mean()  # lr 1e-3
    assert diff.max() < 3e-3  # never more than three steps apart
    proc = run_cli("fairseq-train", m30k_bin, *[f if f != "adam" else "torch_adamw" for f in TRAIN],
                   "--save-dir", tmp_path / "torch_adamw", "--max-update", "4")
    assert "@ 3 updates" in proc.stdout + proc.stderr
