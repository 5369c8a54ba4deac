"""The paper's protocol by default: top-1 gating at inference, validation under the training
gating with the top-1 loss beside it, the top-2 baseline with GShard's renormalised combine
weights, and checkpoints that keep the options they were trained with."""

import json
import math

import pytest
import torch
from fairseq import metrics

import fairseq_adaptive_moe  # noqa: F401  (registers the models, criterions; allows checkpoints)
from conftest import MOE_TINY, TINY_TRANSLATION, USER_DIR, run_cli
from fairseq_adaptive_moe.models.config import MOE_DEFAULTS, resolve_combine_weights, set_moe_defaults
from fairseq_adaptive_moe.moe import ExpertFFN, GateConfigError, MoELayer, TopKGate, eval_gating, gates


def json_records(text, kind="train_inner"):
    return [json.loads(line.split(f"| {kind} | ", 1)[1]) for line in text.splitlines()
            if f"| {kind} | " in line]


def write_dicts(folder) -> None:
    words = "".join(f"w{i} {100 - i}\n" for i in range(40))
    for lang in ("de", "en"):
        (folder / f"dict.{lang}.txt").write_text(words)


def parse(data, *flags):
    """fairseq-train's parsed args for adaptive_moe_transformer_tiny (what the checkpoint saves)."""
    from fairseq import options

    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, [
        str(data), "--user-dir", USER_DIR, "--task", "translation", "-s", "de", "-t", "en",
        *MOE_TINY, "--optimizer", "adam", "--lr", "1e-3", "--cpu", "--seed", "1", *flags])


def build(data, *flags):
    """(model, criterion, task) built in this process as fairseq-train builds them."""
    from fairseq import tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    cfg = convert_namespace_to_omegaconf(parse(data, *flags))
    task = tasks.setup_task(cfg.task)
    return task.build_model(cfg.model), task.build_criterion(cfg.criterion), task


def sample(task, batch=6, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    src = torch.randint(d.nspecial, len(d), (batch, length), generator=g)
    tgt = torch.randint(d.nspecial, len(d), (batch, length), generator=g)
    src[:, -1] = tgt[:, -1] = d.eos()
    prev = torch.cat([tgt[:, -1:], tgt[:, :-1]], dim=1)
    return {"net_input": {"src_tokens": src, "src_lengths": torch.full((batch,), length),
                          "prev_output_tokens": prev},
            "target": tgt, "ntokens": tgt.numel(), "id": torch.arange(batch)}


# ---- defaults ----------------------------------------------------------------------------------

def test_defaults_are_the_papers_protocol(tmp_path):
    write_dicts(tmp_path)
    assert MOE_DEFAULTS["moe_eval_gating"] == "top1"
    assert MOE_DEFAULTS["moe_combine_weights"] == "auto"
    cases = {(): ("top1", "softmax"),
             ("--moe-gating", "top2"): ("top1", "renormalized"),
             ("--moe-gating", "top1"): ("top1", "softmax"),
             ("--moe-gating", "top2", "--moe-combine-weights", "softmax"): ("top1", "softmax"),
             ("--moe-combine-weights", "renormalized"): ("top1", "renormalized"),
             ("--moe-eval-gating", "train"): ("train", "softmax")}
    for flags, expected in cases.items():
        args = parse(tmp_path, *flags)  # the namespace fairseq saves as the checkpoint's config
        assert (args.moe_eval_gating, args.moe_combine_weights) == expected, flags


def test_top2_default_combine_weights_are_renormalized_and_sum_to_one(tmp_path):
    write_dicts(tmp_path)
    model, _, _ = build(tmp_path, "--moe-gating", "top2")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    assert len(layers) == 4
    for layer in layers:
        assert layer.gate.combine_weights == "renormalized"
        decision = layer.gate(torch.randn(50, 64))
        assert decision.used.sum(-1).eq(2).all()
        weight = (decision.weight * decision.used).sum(-1)
        torch.testing.assert_close(weight, torch.ones(50))
        # p1 / (p1 + p2): the first weight is the larger, the softmax ratio is kept
        p = torch.softmax(decision.logits, -1).topk(2).values
        torch.testing.assert_close(decision.weight[:, :2], p / p.sum(-1, keepdim=True))
    adaptive, _, _ = build(tmp_path)
    assert {g.combine_weights for g in gates(adaptive)} == {"softmax"}


def test_configs_keep_the_options_they_were_written_with():
    """set_moe_defaults as it runs on a loaded checkpoint's config (an argparse Namespace, as
    fairseq-train saves it): a saved value stays, an unset one gets the new default."""
    from argparse import Namespace

    def filled(**saved):
        cfg = Namespace(**saved)
        set_moe_defaults(cfg, moe_expert_count=4)
        return cfg.moe_eval_gating, cfg.moe_combine_weights

    # what a checkpoint written before the defaults changed holds
    assert filled(moe_gating="top2", moe_eval_gating="train", moe_combine_weights="softmax") == (
        "train", "softmax")
    assert filled(moe_gating="adaptive", moe_eval_gating="train", moe_combine_weights="softmax") == (
        "train", "softmax")
    assert filled(moe_gating="top2") == ("top1", "renormalized")
    assert filled(moe_gating="top2", moe_combine_weights="auto") == ("top1", "renormalized")
    assert filled(moe_gating="adaptive", moe_eval_gating=None) == ("top1", "softmax")
    assert resolve_combine_weights(Namespace(moe_gating="top2")) == "renormalized"


# ---- eval_gating -------------------------------------------------------------------------------

def test_eval_gating_sets_and_restores_every_gate():
    torch.manual_seed(0)
    model = torch.nn.ModuleList([
        MoELayer(TopKGate(8, 4, "adaptive", threshold=0.5, eval_policy="top1"), ExpertFFN(4, 8, 16)),
        MoELayer(TopKGate(8, 4, "top2", eval_policy="adaptive"), ExpertFFN(4, 8, 16))]).eval()
    x = torch.randn(40, 8)
    assert [layer.gate.active_policy() for layer in model] == ["top1", "adaptive"]
    with eval_gating(model, "train") as found:
        assert found == [layer.gate for layer in model]
        assert [layer.gate.active_policy() for layer in model] == ["adaptive", "top2"]
        assert model[0](x)[1].num_multi.item() > 0
    with eval_gating(model, "top1"):
        assert all(layer(x)[1].num_multi.item() == 0 for layer in model)
        model.train()
        assert [layer.gate.active_policy() for layer in model] == ["adaptive", "top2"]
        model.eval()
    assert [layer.gate.eval_policy for layer in model] == ["top1", "adaptive"]
    with pytest.raises(RuntimeError):
        with eval_gating(model, "top2"):
            raise RuntimeError("inside")
    assert [layer.gate.eval_policy for layer in model] == ["top1", "adaptive"]  # restored
    with pytest.raises(GateConfigError, match="eval_policy"):
        with eval_gating(model, "top3"):
            pass
    with eval_gating(torch.nn.Linear(2, 2), "train") as found:  # a dense model: nothing to set
        assert found == []


# ---- validation: the training gating's loss, and top-1's beside it ----------------------------

def reduce(criterion, logs):
    with metrics.aggregate() as agg:
        criterion.__class__.reduce_metrics(logs)
    return agg.get_smoothed_values()


def test_validation_loss_is_the_training_gatings_and_top1_is_logged_beside_it(tmp_path):
    write_dicts(tmp_path)
    model, criterion, task = build(tmp_path, "--label-smoothing", "0.1")
    s = sample(task)
    model.eval()
    assert {g.eval_policy for g in gates(model)} == {"top1"}  # the new default
    with torch.no_grad():
        loss, sample_size, log = criterion(model, s)
        with eval_gating(model, "train"):
            expected = criterion.moe_forward(model, s)
        with eval_gating(model, "top1"):
            top1 = criterion.moe_forward(model, s)
    assert {g.eval_policy for g in gates(model)} == {"top1"}  # restored
    assert torch.equal(loss, expected[0]) and sample_size == expected[1]
    assert torch.equal(log["loss"], expected[2]["loss"])
    assert torch.equal(log["moe_multi_enc0"], expected[2]["moe_multi_enc0"])  # stats: training gating
    assert log["moe_multi_enc0"].item() > 0
    assert torch.equal(log["loss_top1"], top1[2]["loss"])
    assert torch.equal(log["nll_loss_top1"], top1[2]["nll_loss"])
    assert log["loss_top1"].item() != log["loss"].item()
    for key in ("loss", "loss_top1", "nll_loss_top1"):  # no host read before reduce
        assert torch.is_tensor(log[key]), key

    values = reduce(criterion, [log, log])
    assert values["loss"] == pytest.approx(round(log["loss"].item() / s["ntokens"] / math.log(2), 3))
    assert values["loss_top1"] == pytest.approx(
        round(log["loss_top1"].item() / s["ntokens"] / math.log(2), 3))
    assert values["nll_loss_top1"] == pytest.approx(
        round(log["nll_loss_top1"].item() / s["ntokens"] / math.log(2), 3))
    assert values["ppl_top1"] == pytest.approx(2 ** values["nll_loss_top1"], rel=1e-2)

    model.train()  # a training forward: one forward, no top-1 entries
    _, _, log = criterion(model, s)
    assert "loss_top1" not in log
    assert "loss_top1" not in reduce(criterion, [log])


@pytest.mark.parametrize("flags", [["--no-moe-valid-top1"], ["--moe-gating", "top1"],
                                   ["--moe-freq", "0"]])
def test_top1_validation_forward_is_skipped(tmp_path, flags):
    """Switched off, or not needed: a top-1 or dense model's two losses are the same."""
    write_dicts(tmp_path)
    model, criterion, task = build(tmp_path, *flags)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    model.eval()
    with torch.no_grad():
        _, _, log = criterion(model, sample(task))
    assert len(calls) == 1 and "loss_top1" not in log


def test_lm_criterion_validation(tmp_path):
    """adaptive_moe_cross_entropy: the same protocol; the perplexity follows the loss."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    (tmp_path / "dict.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(40)))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(tmp_path), "--user-dir", USER_DIR, "--task", "language_modeling",
        "--arch", "adaptive_moe_transformer_lm_tiny", "--criterion", "adaptive_moe_cross_entropy",
        "--tokens-per-sample", "16", "--optimizer", "adam", "--cpu", "--seed", "1"])
    assert (args.moe_eval_gating, args.moe_combine_weights) == ("top1", "softmax")
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    tokens = torch.randint(4, len(task.dictionary), (4, 16), generator=torch.Generator().manual_seed(1))
    s = {"net_input": {"src_tokens": tokens, "src_lengths": torch.full((4,), 16)},
         "target": torch.roll(tokens, -1, 1), "ntokens": tokens.numel(), "id": torch.arange(4)}
    model.eval()
    with torch.no_grad():
        _, _, log = criterion(model, s)
        with eval_gating(model, "top1"):
            top1 = criterion.moe_forward(model, s)
    assert torch.equal(log["loss_top1"], top1[2]["loss"]) and "nll_loss_top1" not in log
    values = reduce(criterion, [log])
    assert values["ppl_top1"] == pytest.approx(2 ** values["loss_top1"], rel=1e-2)
    assert set(values) >= {"loss", "ppl", "loss_top1", "ppl_top1"}


# ---- through fairseq's command-line tools -----------------------------------------------------

def load(path, data, **overrides):
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(path)], arg_overrides={"data": str(data), **overrides})
    return models[0], cfg, task


def share_per_layer(model, task, training: bool):
    task.load_dataset("valid")
    batch = next(iter(task.get_batch_iterator(task.dataset("valid"), max_tokens=800).next_epoch_itr()))
    model.train(training)
    with torch.no_grad():
        _, extra = model(**batch["net_input"])
    return {s.name: s.num_multi.item() / s.num_tokens.item() for s in extra["moe_stats"]}


@pytest.mark.slow
def test_generate_without_override_routes_with_top1(tiny_moe_run, m30k_bin, tmp_path):
    """The issue's acceptance: fairseq-generate on an adaptive checkpoint, no override, routes
    with top-1 (per-layer two-expert share 0 at inference, non-zero in training); the training
    gating is one override away."""
    ckpt = tiny_moe_run / "checkpoint_last.pt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["cfg"]["model"]
    assert (saved.moe_gating, saved.moe_eval_gating) == ("adaptive", "top1")
    model, _, task = load(ckpt, m30k_bin)  # what fairseq-generate loads
    assert {g.eval_policy for g in gates(model)} == {"top1"}
    inference = share_per_layer(model, task, training=False)
    training = share_per_layer(model, task, training=True)
    assert len(inference) == 4 and set(inference.values()) == {0.0}
    assert all(share > 0 for share in training.values()), training
    as_trained, _, _ = load(ckpt, m30k_bin, moe_eval_gating="train")
    assert all(v > 0 for v in share_per_layer(as_trained, task, training=False).values())

    common = [m30k_bin, "--user-dir", USER_DIR, "--path", ckpt, "--gen-subset", "valid", "--cpu",
              "--beam", "2", "--max-len-b", "20", "--required-batch-size-multiple", "1"]
    hyps = {}
    for name, extra in (("default", []), ("top1", ["--model-overrides", "{'moe_eval_gating': 'top1'}"]),
                        ("train", ["--model-overrides", "{'moe_eval_gating': 'train'}"])):
        out = run_cli("fairseq-generate", *common, *extra).stdout
        hyps[name] = sorted(line for line in out.splitlines() if line.startswith("H-"))
        assert len(hyps[name]) == 60
    assert hyps["default"] == hyps["top1"]


@pytest.mark.slow
def test_train_logs_both_validation_losses(tiny_moe_run, m30k_bin):
    """valid_loss is the loss under the training gating (adaptive), valid_loss_top1 under top-1:
    each equals the loss of checkpoint_last (saved after that validation) under that gating."""
    from fairseq import checkpoint_utils

    valid = json_records((tiny_moe_run / "train.log").read_text(), "valid")[-1]
    for key in ("valid_loss", "valid_nll_loss", "valid_ppl", "valid_loss_top1",
                "valid_nll_loss_top1", "valid_ppl_top1"):
        assert key in valid, sorted(valid)
    assert float(valid["valid_moe_2x"]) > 0  # the routing stats are the training gating's

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(tiny_moe_run / "checkpoint_last.pt")], arg_overrides={"data": str(m30k_bin)})
    model = models[0].eval()
    criterion = task.build_criterion(cfg.criterion)
    task.load_dataset("valid")
    itr = task.get_batch_iterator(  # fairseq-train's validation batches (multiple of 8: the
        task.dataset("valid"), max_tokens=cfg.dataset.max_tokens_valid,  # last 4 dropped)
        required_batch_size_multiple=cfg.dataset.required_batch_size_multiple).next_epoch_itr()
    with torch.no_grad():
        logs = [task.valid_step(s, model, criterion)[2] for s in itr]
    values = reduce(criterion, logs)
    for key in ("loss", "nll_loss", "loss_top1", "nll_loss_top1"):
        assert values[key] == pytest.approx(float(valid[f"valid_{key}"]), abs=2e-3), key
    assert values["loss"] != values["loss_top1"]


@pytest.mark.slow
def test_train_top2_saves_renormalized_and_switches(m30k_bin, tmp_path):
    """A top-2 run saves GShard's renormalised combine weights and logs both losses; a top-1 run
    and --no-moe-valid-top1 log valid_loss alone."""
    save = tmp_path / "top2"
    log = run_cli("fairseq-train", m30k_bin, *TINY_TRANSLATION, *MOE_TINY, "--moe-gating", "top2",
                  "--max-update", "1", "--save-dir", save)
    text = log.stdout + log.stderr
    assert "valid_loss_top1" in json_records(text, "valid")[-1]
    saved = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert saved["cfg"]["model"].moe_combine_weights == "renormalized"
    assert saved["cfg"]["criterion"]["no_moe_valid_top1"] is False
    for flags in (["--moe-gating", "top1"], ["--no-moe-valid-top1"]):
        proc = run_cli("fairseq-train", m30k_bin, *TINY_TRANSLATION, *MOE_TINY, *flags,
                       "--max-update", "1", "--no-save", "--save-dir", tmp_path / "x")
        valid = json_records(proc.stdout + proc.stderr, "valid")[-1]
        assert "valid_loss" in valid and not any("top1" in k for k in valid), (flags, valid)


@pytest.mark.slow
def test_old_checkpoint_config_keeps_training_gating_and_combine_weights(tiny_moe_run, m30k_bin,
                                                                         tmp_path):
    """A checkpoint written before the defaults changed saved moe_eval_gating 'train' and
    moe_combine_weights 'softmax' in its config (fairseq-train saves every option, set or not):
    it keeps routing and combining as it was trained."""
    from argparse import Namespace

    state = torch.load(tiny_moe_run / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert isinstance(state["cfg"]["model"], Namespace)
    assert {"moe_eval_gating", "moe_combine_weights"} <= set(vars(state["cfg"]["model"]))

    def variant(name, **fields):
        """checkpoint_last with fields of its saved model config changed."""
        cfg = dict(state["cfg"], model=Namespace(**{**vars(state["cfg"]["model"]), **fields}))
        path = tmp_path / f"{name}.pt"
        torch.save({**state, "cfg": cfg}, path)
        return path

    model, cfg, task = load(variant("old", moe_eval_gating="train", moe_combine_weights="softmax"),
                            m30k_bin)
    assert (cfg.model.moe_eval_gating, cfg.model.moe_combine_weights) == ("train", "softmax")
    assert {(g.eval_policy, g.combine_weights) for g in gates(model)} == {("train", "softmax")}
    assert all(v > 0 for v in share_per_layer(model, task, training=False).values())
    top1, _, _ = load(variant("old", moe_eval_gating="train"), m30k_bin, moe_eval_gating="top1")
    assert set(share_per_layer(top1, task, training=False).values()) == {0.0}  # one override away
    model, _, _ = load(variant("top2-old", moe_gating="top2", moe_eval_gating="train",
                               moe_combine_weights="softmax"), m30k_bin)
    assert {(g.policy, g.combine_weights) for g in gates(model)} == {("top2", "softmax")}
    model, _, _ = load(variant("top2-new", moe_gating="top2", moe_combine_weights="renormalized"),
                       m30k_bin)
    assert {g.combine_weights for g in gates(model)} == {"renormalized"}
