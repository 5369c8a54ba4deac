"""adaptive_moe_bart: dense BART checkpoints into MoE BART (identity, --restore-file), training,
upcycling and the routing report, on a slice of CNN/DailyMail (CPU). Training a tiny
adaptive_moe_bart from scratch is covered by test_summarization's recipe run."""

import copy
import json

import pytest
import torch

import fairseq_adaptive_moe  # noqa: F401  (what --user-dir does: registers, allows checkpoints)
from conftest import USER_DIR, load_script, run_cli, shared_data
from fairseq_adaptive_moe.cli import routing, upcycle
from fairseq_adaptive_moe import errors
from fairseq_adaptive_moe.models.adaptive_moe_bart import AdaptiveMoEBARTModel, MoECheckpointError, moe_layers

pytestmark = pytest.mark.slow

TINY = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "64",
        "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128",
        "--decoder-ffn-embed-dim", "128", "--encoder-attention-heads", "4",
        "--decoder-attention-heads", "4"]
COMMON = [
    "--user-dir", USER_DIR, "--task", "translation", "--source-lang", "source",
    "--target-lang", "target", "--truncate-source", "--max-source-positions", "128",
    "--max-target-positions", "128", "--label-smoothing", "0.1", "--optimizer", "adam",
    "--lr", "1e-3", "--max-tokens", "2048", "--cpu", "--seed", "2", "--log-format", "json",
    "--log-interval", "1", "--no-progress-bar", "--no-epoch-checkpoints",
]


def prepare_cnndm(tmp_path_factory, train=200, evals=16):
    """The first lines of cnndm-small: sentencepiece 1000, articles cut to 120 tokens."""
    prepare = load_script("examples/summarization/prepare.py")
    out = tmp_path_factory.mktemp("cnndm") / "data-bin"
    rc = prepare.main(["--data", str(shared_data("cnndm-small")), "--out", str(out),
                       "--vocab-size", "1000", "--max-train-lines", str(train),
                       "--max-eval-lines", str(evals), "--max-source-tokens", "120",
                       "--max-target-tokens", "60"])
    assert rc == 0
    return out


def train_log_records(log, tag="train_inner"):
    return [json.loads(line.split(f"| {tag} | ", 1)[1]) for line in log.splitlines()
            if f"| {tag} | " in line]


@pytest.fixture(scope="module")
def cnndm_bin(tmp_path_factory):
    return prepare_cnndm(tmp_path_factory)


@pytest.fixture(scope="module")
def dense_bart(cnndm_bin, tmp_path_factory):
    """fairseq's own dense ``bart`` (bart_base with tiny dims), trained 3 updates."""
    save = tmp_path_factory.mktemp("dense-bart")
    run_cli("fairseq-train", cnndm_bin, *COMMON, "--arch", "bart_base", *TINY,
            "--criterion", "label_smoothed_cross_entropy", "--max-update", "3", "--save-dir", save)
    return save / "checkpoint_last.pt"


def load(path, data, **overrides):
    from fairseq import checkpoint_utils

    (model,), cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": str(data), **overrides})
    return model.eval(), cfg, task


def valid_batches(task, model, n=2):
    from fairseq import utils

    task.load_dataset("valid")
    itr = task.get_batch_iterator(
        dataset=task.dataset("valid"), max_sentences=8, ignore_invalid_inputs=True,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        seed=1).next_epoch_itr(shuffle=False)
    return [b for _, b in zip(range(n), itr)]


def moe_from_dense(dense_path, data, **moe):
    """What ``fairseq-train --arch adaptive_moe_bart --restore-file DENSE`` does: an MoE model with
    the dense model's dims, then the dense state dict through ``load_state_dict``."""
    from fairseq import checkpoint_utils, tasks

    state = checkpoint_utils.load_checkpoint_to_cpu(str(dense_path), {"data": str(data)})
    args = copy.deepcopy(state["cfg"].model)
    args.arch = args._name = "adaptive_moe_bart"
    for key, value in {"moe_expert_count": 4, **moe}.items():
        setattr(args, key, value)
    task = tasks.setup_task(state["cfg"].task)
    model = task.build_model(args)
    model.load_state_dict(state["model"], strict=True, model_cfg=args)
    return model.eval(), task, args


def same_outputs(dense, moe, task):
    """Assert equal decoder outputs (non-padding positions) on two valid batches; returns the
    number of (token, layer) pairs that used two experts."""
    multi = 0
    with torch.no_grad():
        for sample in valid_batches(task, dense):
            expected, _ = dense(**sample["net_input"])
            got, extra = moe(**sample["net_input"])
            keep = sample["target"].ne(task.target_dictionary.pad())
            torch.testing.assert_close(got[keep], expected[keep], atol=1e-5, rtol=1e-5)
            assert [s.name for s in extra["moe_stats"]] == [
                "encoder.0", "encoder.1", "decoder.0", "decoder.1"]
            multi += sum(int(s.num_multi) for s in extra["moe_stats"])
    return multi


@pytest.mark.parametrize("gating", ["adaptive", "top1", "top2"])
def test_dense_bart_restored_into_moe_reproduces_it(dense_bart, cnndm_bin, gating):
    dense, _, task = load(dense_bart, cnndm_bin)
    moe, _, _ = moe_from_dense(dense_bart, cnndm_bin, moe_gating=gating,
                            moe_combine_weights="renormalized", moe_threshold=0.2,
                            moe_eval_gating="train")  # eval mode routes as trained
    assert isinstance(moe, AdaptiveMoEBARTModel) and len(moe_layers(moe)) == 4
    dense_state = dense.state_dict()
    for name, layer in moe_layers(moe):
        prefix = name[: -len(".moe")]
        for e in range(4):
            assert torch.equal(layer.experts.fc1_weight[e], dense_state[f"{prefix}.fc1.weight"].t())
            assert torch.equal(layer.experts.fc2_bias[e], dense_state[f"{prefix}.fc2.bias"])
        # the gate keeps nn.Linear's init, not BART's N(0, 0.02): bounded by 1/sqrt(d)
        assert layer.gate.wg.weight.abs().max() <= 64 ** -0.5
    assert (same_outputs(dense, moe, task) > 0) == (gating != "top1")  # two experts combined


def test_random_init_and_softmax_weights_change_the_outputs(dense_bart, cnndm_bin):
    dense, _, task = load(dense_bart, cnndm_bin)
    random_moe, _, _ = moe_from_dense(dense_bart, cnndm_bin, moe_init_from_dense="random",
                                   moe_combine_weights="renormalized")
    softmax_moe, _, _ = moe_from_dense(dense_bart, cnndm_bin)  # default combine weights: softmax
    w = moe_layers(random_moe)[0][1].experts.fc1_weight
    assert not torch.equal(w[0], dense.state_dict()["encoder.layers.0.fc1.weight"].t())
    assert not torch.equal(w[0], w[1])
    sample = valid_batches(task, dense, 1)[0]
    with torch.no_grad():
        expected, _ = dense(**sample["net_input"])
        for model in (random_moe, softmax_moe):
            got, _ = model(**sample["net_input"])
            assert (got - expected).abs().max() > 1e-3


def test_moe_checkpoint_mismatch_one_line(dense_bart, cnndm_bin, capsys):
    moe, task, args = moe_from_dense(dense_bart, cnndm_bin)
    state = moe.state_dict()
    for key, value, message in (("moe_expert_count", 2, "has 4 experts of shape (64, 128), this "
                                 "model 2"), ("moe_freq", 2, "encoder.layers.0 is an MoE layer "
                                              "but this model's is dense")):
        other = copy.deepcopy(args)
        setattr(other, key, value)
        with pytest.raises(MoECheckpointError) as info:  # one line at fairseq's error boundary
            task.build_model(other).load_state_dict(dict(state), strict=True)
        err = errors.one_line(info.value)
        assert err == str(info.value) and message in err, err
        assert err.startswith("cannot load the checkpoint into adaptive_moe_bart"), err


def test_restore_file_trains_on(dense_bart, cnndm_bin, tmp_path):
    proc = run_cli("fairseq-train", cnndm_bin, *COMMON, "--arch", "adaptive_moe_bart_tiny", *TINY,
                   "--moe-expert-count", "4", "--criterion",
                   "adaptive_moe_label_smoothed_cross_entropy", "--restore-file", dense_bart,
                   "--reset-optimizer", "--reset-dataloader", "--reset-meters",
                   "--max-update", "2", "--disable-validation", "--save-dir", tmp_path / "ft")
    log = proc.stdout + proc.stderr
    assert "Loaded checkpoint" in log and "@ 0 updates" in log
    assert "the FFNs of 4 layers became 4 experts each (copies of the dense FFN" in log
    assert "does not start from the dense model's outputs" in log  # softmax combine weights
    inner = train_log_records(log)
    assert [int(r["num_updates"]) for r in inner] == [1, 2]
    assert {"moe_2x_enc0", "moe_2x_dec1", "moe_loss"} <= set(inner[-1])
    # the saved checkpoint is MoE and loads unchanged (no conversion, no warning)
    moe, cfg, _ = load(tmp_path / "ft" / "checkpoint_last.pt", cnndm_bin)
    assert cfg.model.arch == "adaptive_moe_bart_tiny" and len(moe_layers(moe)) == 4


def test_bad_moe_flag_one_line(cnndm_bin, tmp_path):
    proc = run_cli("fairseq-train", cnndm_bin, *COMMON, "--arch", "adaptive_moe_bart_tiny",
                   "--criterion", "adaptive_moe_label_smoothed_cross_entropy",
                   "--moe-threshold", "-1", "--save-dir", tmp_path / "x", check=False)
    assert proc.returncode != 0 and "error: --moe-threshold must be >= 0" in proc.stderr
    assert not (tmp_path / "x").exists()


# ---- adaptive-moe-upcycle and adaptive-moe-routing on BART --------------------------------------

@pytest.fixture(scope="module")
def upcycled_bart(dense_bart, cnndm_bin, tmp_path_factory):
    out = tmp_path_factory.mktemp("up-bart") / "moe.pt"
    proc = run_cli("adaptive-moe-upcycle", dense_bart, "--out", out, "--moe-expert-count", "4",
                   "--data", cnndm_bin)
    assert "adaptive_moe_bart_base" in proc.stdout and "--restore-file" in proc.stdout
    return out


@pytest.mark.parametrize("gating", ["train", "top1", "top2"])
def test_upcycled_bart_reproduces_dense(upcycled_bart, dense_bart, cnndm_bin, gating):
    dense, _, task = load(dense_bart, cnndm_bin)
    moe, cfg, _ = load(upcycled_bart, cnndm_bin, moe_eval_gating=gating)
    assert cfg.model.arch == "adaptive_moe_bart_base" and isinstance(moe, AdaptiveMoEBARTModel)
    assert cfg.model.moe_combine_weights == "renormalized"
    assert (same_outputs(dense, moe, task) > 0) == (gating != "top1")


def test_upcycled_bart_trains_with_printed_flags(upcycled_bart, cnndm_bin, tmp_path):
    flags = torch.load(upcycled_bart, map_location="cpu")["extra_state"]["upcycle"]["train_flags"]
    assert flags[:2] == ["--arch", "adaptive_moe_bart_base"] and "--encoder-embed-dim" in flags
    proc = run_cli("fairseq-train", cnndm_bin, *COMMON, *flags, "--criterion",
                   "adaptive_moe_label_smoothed_cross_entropy", "--restore-file", upcycled_bart,
                   "--reset-optimizer", "--max-update", "1", "--save-dir", tmp_path / "ft",
                   "--no-save", "--disable-validation")
    log = proc.stdout + proc.stderr
    assert "Loaded checkpoint" in log and "became" not in log  # already MoE: loaded unchanged
    assert [int(r["num_updates"]) for r in train_log_records(log)] == [1]


def test_upcycle_bart_expert_count_mismatch_is_clear(upcycled_bart, cnndm_bin, tmp_path, capsys):
    rc = upcycle.main([str(upcycled_bart), "-o", str(tmp_path / "again.pt"),
                       "--moe-expert-count", "8", "--data", str(cnndm_bin)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "already an MoE checkpoint" in err[0], err


def test_routing_report_on_moe_bart(upcycled_bart, cnndm_bin, tmp_path):
    out = tmp_path / "report"
    rc = routing.main([str(cnndm_bin), "--path", str(upcycled_bart), "--gen-subset", "valid",
                       "--out", str(out), "--cpu", "--no-progress-bar", "--max-sentences", "8"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [e["name"] for e in summary["layers"]] == ["encoder.0", "encoder.1", "decoder.0",
                                                      "decoder.1"]
    assert summary["sentences"] == 16 and summary["overall"]["tokens"] > 0
    assert summary["sides"]["encoder"]["tokens"] > summary["sides"]["decoder"]["tokens"]
    assert (out / "report.md").is_file()
