"""The two-expert budget (``--moe-two-expert-budget S``): the controller, its state, its flags,
two gloo ranks, and fairseq-train runs (tracking, extreme budgets, resume, expert parallelism,
the curriculum, upcycling)."""

import argparse
import json
import math
import os
import socket
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import BIN, MOE_TINY, TINY_TRANSLATION, USER_DIR, run_cli
from fairseq_adaptive_moe.moe import BudgetConfig, TopKGate, adjust_threshold
from fairseq_adaptive_moe.moe.budget import count_tokens

LAYERS = ("enc0", "enc1", "dec0", "dec1")


def gate(target=0.2, threshold=0.1, dim=16, experts=8, **budget):
    torch.manual_seed(0)
    return TopKGate(dim, experts, threshold=threshold, budget=BudgetConfig(target, **budget))


def batches(n, tokens=400, dim=16, seed=1, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, dim, generator=g) * scale for _ in range(n)]


def share(decision):
    return float((decision.used.sum(-1) >= 2).float().mean())


def drive(g, xs, start=0):
    """One forward per update, as fairseq does: set_num_updates(n) then train."""
    g.train()
    thresholds, shares = [], []
    for n, x in enumerate(xs, start):
        g.set_num_updates(n)
        thresholds.append(float(g.budget_threshold))
        shares.append(share(g(x)))
    return thresholds, shares


# ---- the controller --------------------------------------------------------------------------

def test_step_follows_the_formula_and_bounds():
    cfg = BudgetConfig(0.2, gain=2.0, min_threshold=1e-3, max_threshold=0.5)
    t = torch.tensor(0.1)
    step = lambda tokens, multi: float(adjust_threshold(t, torch.tensor([tokens, multi]), cfg))  # noqa: E731
    assert step(100.0, 25.0) == pytest.approx(0.1 * math.exp(2.0 * (0.2 - 0.25) / 0.2))  # down
    assert step(100.0, 15.0) == pytest.approx(0.1 * math.exp(2.0 * 0.05 / 0.2))  # too few: up
    assert step(100.0, 90.0) == pytest.approx(0.1 * math.exp(-2.0))  # error clipped to -1
    assert step(100.0, 20.0) == pytest.approx(0.1)
    near_one = BudgetConfig(0.9, gain=1.0)  # relative to 1 - S
    assert float(adjust_threshold(t, torch.tensor([100.0, 85.0]), near_one)) == \
        pytest.approx(0.1 * math.exp(0.05 / 0.1))
    assert step(0.0, 0.0) == pytest.approx(0.1)  # nothing counted: T kept
    big = BudgetConfig(0.99, gain=50.0, min_threshold=1e-3, max_threshold=0.5)
    assert float(adjust_threshold(t, torch.tensor([10.0, 0.0]), big)) == 0.5
    small = BudgetConfig(0.01, gain=50.0, min_threshold=1e-3, max_threshold=0.5)
    assert float(adjust_threshold(t, torch.tensor([10.0, 10.0]), small)) == pytest.approx(1e-3)


@pytest.mark.parametrize("target", [0.01, 0.05, 0.2, 0.6, 0.95])
def test_share_tracks_the_target(target):
    g = gate(target)
    _, shares = drive(g, batches(150))
    assert sum(shares[-50:]) / 50 == pytest.approx(target, abs=0.02)


def test_more_than_two_experts_counts_tokens_with_more_than_one():
    torch.manual_seed(0)
    g = TopKGate(16, 8, threshold=0.1, max_experts=3, budget=BudgetConfig(0.3))
    _, shares = drive(g, batches(150))
    assert sum(shares[-50:]) / 50 == pytest.approx(0.3, abs=0.02)
    d = g(batches(1)[0])
    assert (d.experts_per_token == 3).any()  # some tokens take three, counted once each
    counts = count_tokens(d.used, d.token_mask)
    assert counts[1] == (d.experts_per_token >= 2).sum()


def test_padding_is_not_counted():
    g = gate()
    g.train()
    g.set_num_updates(0)
    mask = torch.zeros(400, dtype=torch.bool)
    mask[:100] = True
    g(batches(1)[0], mask)
    assert float(g.budget_counts[0]) == 100


def test_interval_warmup_and_freeze():
    xs = batches(40)
    every3, _ = drive(gate(interval=3), xs)
    changes = [n for n in range(1, 40) if every3[n] != every3[n - 1]]
    assert changes and all(n % 3 == 0 for n in changes)

    warm, _ = drive(gate(warmup_updates=10), xs)
    assert warm[:11] == [pytest.approx(0.1)] * 11 and warm[11] != pytest.approx(0.1)

    frozen, _ = drive(gate(freeze_after=12), xs)
    assert frozen[12] != frozen[11] and len(set(frozen[12:])) == 1


def test_eval_does_not_count_and_follows_eval_gating():
    g = TopKGate(16, 8, threshold=0.1, eval_policy="top1", budget=BudgetConfig(0.5))
    drive(g, batches(5))
    g.eval()
    before = g.budget_counts.clone()
    d = g(batches(1)[0])
    assert torch.equal(g.budget_counts, before)
    assert (d.experts_per_token == 1).all()  # the paper's top-1 evaluation
    g.eval_policy = "train"
    d = g(batches(1)[0])  # the training gating with the current T
    assert (d.experts_per_token == 2).any()


def test_no_host_read_in_step():
    """The step is tensor operations on the buffers: T and the counts never become numbers."""
    g = gate()
    drive(g, batches(3))
    calls = []
    original = torch.Tensor.item
    torch.Tensor.item = lambda self: calls.append(1) or original(self)
    try:
        g.set_num_updates(3)
        g(batches(1)[0])
        g.set_num_updates(4)
    finally:
        torch.Tensor.item = original
    assert not calls


# ---- state: checkpoints, resume -------------------------------------------------------------

def test_resume_from_state_dict_matches_uninterrupted():
    xs = batches(30)
    straight, _ = drive(gate(interval=4), xs)
    first = gate(interval=4)
    drive(first, xs[:13])  # stopped after 13 updates: counts of updates 13 pending (13 % 4 != 0)
    state = {k: v.clone() for k, v in first.state_dict().items()}
    resumed = gate(interval=4)
    resumed.set_num_updates(13)  # fairseq calls this before loading the state
    resumed.load_state_dict(state)
    rest, _ = drive(resumed, xs[13:], start=13)
    assert rest == straight[13:]


def test_old_checkpoints_load_with_the_starting_threshold():
    plain = TopKGate(16, 8, threshold=0.1)
    budget = gate(threshold=0.05)
    budget.load_state_dict(plain.state_dict())  # strict: the missing buffers are filled
    assert float(budget.budget_threshold) == pytest.approx(0.05)
    assert torch.equal(budget.budget_counts, torch.zeros(2))
    drive(budget, batches(5))
    plain.load_state_dict(budget.state_dict())  # buffers ignored without a budget
    assert plain.routing_threshold() == 0.1 and "budget_threshold" not in plain.state_dict()


# ---- bad input --------------------------------------------------------------------------------

def moe_args(**overrides):
    from fairseq_adaptive_moe.models.config import MOE_DEFAULTS
    return argparse.Namespace(**{**MOE_DEFAULTS, **overrides})


@pytest.mark.parametrize("overrides, message", [
    (dict(moe_two_expert_budget=0.0), "--moe-two-expert-budget must be between 0 and 1"),
    (dict(moe_two_expert_budget=1.0), "--moe-two-expert-budget must be between 0 and 1"),
    (dict(moe_two_expert_budget=-0.2), "--moe-two-expert-budget must be between 0 and 1"),
    (dict(moe_two_expert_budget=float("nan")), "--moe-two-expert-budget must be between 0 and 1"),
    (dict(moe_two_expert_budget=0.2, moe_gating="top1"), "--moe-two-expert-budget needs adaptive"),
    (dict(moe_two_expert_budget=0.2, moe_gating="top2"), "--moe-two-expert-budget needs adaptive"),
    (dict(moe_two_expert_budget=0.2, moe_max_experts=1), "--moe-two-expert-budget needs max_experts"),
    (dict(moe_two_expert_budget=0.2, moe_threshold=0.0), "--moe-threshold must be within"),
    (dict(moe_two_expert_budget=0.2, moe_budget_gain=0.0), "--moe-budget-gain must be > 0"),
    (dict(moe_two_expert_budget=0.2, moe_budget_interval=0), "--moe-budget-interval must be >= 1"),
    (dict(moe_two_expert_budget=0.2, moe_budget_min_threshold=0.0), "--moe-budget-min-threshold"),
    (dict(moe_two_expert_budget=0.2, moe_budget_max_threshold=1e-7), "--moe-budget-max-threshold"),
    (dict(moe_two_expert_budget=0.2, moe_budget_warmup_updates=-1), "--moe-budget-warmup-updates"),
    (dict(moe_two_expert_budget=0.2, moe_budget_freeze_after=-1), "--moe-budget-freeze-after"),
])
def test_bad_budget_options_name_the_flag(overrides, message):
    from fairseq_adaptive_moe.models.config import MoEConfigError, check_moe_args
    with pytest.raises(MoEConfigError) as e:
        check_moe_args(moe_args(**overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_budget_options_off_by_default():
    from fairseq_adaptive_moe.models.config import budget_config, check_moe_args
    check_moe_args(moe_args())
    assert budget_config(moe_args()) is None
    assert budget_config(moe_args(moe_two_expert_budget=0.3, moe_budget_interval=5)) == \
        BudgetConfig(0.3, interval=5)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--moe-two-expert-budget", "1.5"],
                                   ["--moe-two-expert-budget", "0.2", "--moe-gating", "top2"]])
def test_bad_input_exits_before_writing(m30k_bin, tmp_path, flags):
    save = tmp_path / "save"
    proc = run_cli("fairseq-train", m30k_bin, *TINY_TRANSLATION, *MOE_TINY, "--max-update", "2",
                   "--save-dir", save, *flags, check=False, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --moe-two-expert-budget"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not save.exists()


# ---- two gloo ranks ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    g = gate(interval=2)
    xs = batches(30, tokens=300, seed=10 + rank)  # each rank its own tokens
    thresholds, _ = drive(g, xs)
    g.set_num_updates(len(xs))
    thresholds.append(float(g.budget_threshold))
    out[rank] = thresholds
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_gloo_ranks_hold_the_same_threshold_at_every_update():
    out = mp.Manager().dict()
    mp.spawn(two_rank_worker, args=(2, free_port(), out), nprocs=2, join=True)
    assert out[0] == out[1]
    # the oracle: one process routing both ranks' tokens at once
    g, xs0, xs1 = gate(interval=2), batches(30, 300, seed=10), batches(30, 300, seed=11)
    single, _ = drive(g, [torch.cat([a, b]) for a, b in zip(xs0, xs1)])
    g.set_num_updates(30)
    single.append(float(g.budget_threshold))
    assert out[0] == pytest.approx(single, rel=1e-5)
    assert len(set(out[0])) > 5  # T did move


# ---- fairseq-train ----------------------------------------------------------------------------

def train_records(text):
    return [json.loads(line.split("| train_inner | ", 1)[1]) for line in text.splitlines()
            if "| train_inner | " in line]


def layer_series(records, key):
    return {n: [float(r[f"{key}_{n}"]) for r in records] for n in LAYERS}


def train(data, save, *flags, max_update):
    proc = run_cli("fairseq-train", data, *TINY_TRANSLATION, *MOE_TINY, "--disable-validation",
                   "--max-update", str(max_update), "--save-dir", save, *flags)
    return proc.stdout + proc.stderr


def budget_buffers(path):
    model = torch.load(path, map_location="cpu", weights_only=False)["model"]
    return {k: v for k, v in model.items() if ".gate.budget_" in k}


@pytest.mark.slow
def test_share_tracks_the_budget_in_fairseq(m30k_bin, tmp_path):
    """S = 0.2 over 300 updates: each layer's mean share over the last 50 within 0.03."""
    log = train(m30k_bin, tmp_path, "--moe-two-expert-budget", "0.2", max_update=300)
    records = train_records(log)
    assert len(records) == 300
    for n, shares in layer_series(records, "moe_2x").items():
        assert sum(shares[-50:]) / 50 == pytest.approx(0.2, abs=0.03), n
    thresholds = layer_series(records, "moe_thr")
    assert all(t[0] == 0.1 and t[-1] != 0.1 for t in thresholds.values())
    saved = budget_buffers(tmp_path / "checkpoint_last.pt")
    assert len(saved) == 8  # T and counts of 4 layers


@pytest.mark.slow
def test_large_budget_with_three_experts_and_the_curriculum(m30k_bin, tmp_path):
    """S = 0.99, --moe-max-experts 3, under the curriculum task: after warm-up at least 95% of
    tokens take more than one expert."""
    log = train(m30k_bin, tmp_path, "--moe-two-expert-budget", "0.99", "--moe-max-experts", "3",
                "--task", "adaptive_moe_translation", "--moe-curriculum",
                "--moe-budget-warmup-updates", "5", max_update=60)
    records = train_records(log)
    assert "moe curriculum" in log
    for n, shares in layer_series(records, "moe_2x").items():
        assert sum(shares[30:]) / len(shares[30:]) >= 0.95, (n, shares[30:])


@pytest.fixture(scope="module")
def small_budget_run(m30k_bin, tmp_path_factory):
    """S = 0.01, controller every 3 updates, 60 updates uninterrupted."""
    save = tmp_path_factory.mktemp("budget-small")
    flags = ["--moe-two-expert-budget", "0.01", "--moe-budget-interval", "3"]
    return save, flags, train_records(train(m30k_bin, save, *flags, max_update=60))


@pytest.mark.slow
def test_small_budget(small_budget_run):
    _, _, records = small_budget_run
    for n, shares in layer_series(records, "moe_2x").items():
        assert sum(shares[30:]) / len(shares[30:]) <= 0.05, (n, shares[30:])


@pytest.mark.slow
def test_stop_and_resume_gives_the_same_thresholds_and_losses(m30k_bin, tmp_path, small_budget_run):
    straight_dir, flags, straight = small_budget_run
    train(m30k_bin, tmp_path, *flags, max_update=31)  # stops mid-interval, mid-epoch
    resumed = train_records(train(m30k_bin, tmp_path, *flags, max_update=60))
    assert [r["num_updates"] for r in resumed] == [str(n) for n in range(32, 61)]
    timing = {"wps", "ups", "wall", "train_wall", "gb_free"}
    strip = lambda r: {k: v for k, v in r.items() if k not in timing}  # noqa: E731
    assert [strip(r) for r in resumed] == [strip(r) for r in straight[31:]]
    a, b = budget_buffers(straight_dir / "checkpoint_last.pt"), budget_buffers(tmp_path / "checkpoint_last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_expert_parallel_shards_hold_one_threshold_and_consolidate(m30k_bin, tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    save = tmp_path / "ep2"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(BIN / "fairseq-train"), str(m30k_bin), *TINY_TRANSLATION, *MOE_TINY,
           "--disable-validation", "--max-update", "8", "--save-dir", str(save),
           "--moe-expert-parallel-size", "2", "--ddp-backend", "legacy_ddp",
           "--moe-two-expert-budget", "0.3", "--num-workers", "0"]
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = train_records(proc.stdout + proc.stderr)
    assert float(records[-1]["moe_thr_enc0"]) != 0.1
    shard0, shard1 = (budget_buffers(save / f"checkpoint_last-ep{r}.pt") for r in (0, 1))
    assert shard0.keys() == shard1.keys() and len(shard0) == 8
    assert all(torch.equal(shard0[k], shard1[k]) for k in shard0)
    run_cli("adaptive-moe-consolidate", save / "checkpoint_last.pt", "--out", tmp_path / "one.pt")
    merged = budget_buffers(tmp_path / "one.pt")
    assert all(torch.equal(merged[k], shard0[k]) for k in shard0)


@pytest.mark.slow
def test_upcycled_checkpoint_starts_at_the_threshold(tiny_dense_run, tmp_path):
    from fairseq_adaptive_moe.tools.upcycle import moe_options, upcycle_checkpoint
    out = tmp_path / "moe.pt"
    options = moe_options(moe_expert_count=4, moe_two_expert_budget=0.3, moe_threshold=0.05)
    upcycle_checkpoint(str(tiny_dense_run / "checkpoint_last.pt"), str(out), options)
    saved = budget_buffers(out)
    thresholds = [v for k, v in saved.items() if k.endswith("budget_threshold")]
    assert thresholds and all(float(t) == pytest.approx(0.05) for t in thresholds)
    cfg = torch.load(out, map_location="cpu", weights_only=False)["cfg"]["model"]
    assert getattr(cfg, "moe_two_expert_budget", None) == 0.3


# ---- the comparison runner --------------------------------------------------------------------

@pytest.mark.experiments
def test_compare_plans_budget_runs(m30k_bin, tmp_path):
    from experiments import compare
    args = compare.parse_args(["--data-bin", str(m30k_bin), "--out", str(tmp_path / "out"),
                               "--schemes", "top2,adaptive,budget", "--budget", "0.15,0.3"])
    runs = compare.plan_runs(args)
    assert runs == [("top2", "top2", None, None, None), ("adaptive", "adaptive", 0.1, None, None),
                    ("budget-S0.15", "budget", 0.1, 0.15, None),
                    ("budget-S0.3", "budget", 0.1, 0.3, None)]
    flags = compare.train_flags(args, "budget", 0.1, tmp_path / "run", budget=0.15)
    assert flags[flags.index("--moe-gating"):][:6] == [
        "--moe-gating", "adaptive", "--moe-threshold", "0.1", "--moe-two-expert-budget", "0.15"]
    args = compare.parse_args(["--data-bin", str(m30k_bin), "--out", str(tmp_path / "out")])
    assert [r[1] for r in compare.plan_runs(args)] == ["dense", "top1", "top2", "adaptive"]
    assert compare.gating_value({"budget": 0.3, "threshold": 0.1}) == "S=0.3"


@pytest.mark.experiments
@pytest.mark.parametrize("budget", ["0", "1", "x", "0.2,1.5"])
def test_compare_bad_budget_is_one_line(m30k_bin, tmp_path, capsys, budget):
    from experiments import compare
    out = tmp_path / "out"
    assert compare.main(["--data-bin", str(m30k_bin), "--out", str(out), "--schemes", "budget",
                         "--budget", budget]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad budget" in err and len(err.splitlines()) == 1 and not out.exists()
