"""Expert parallelism through fairseq-train: ``torchrun --nproc_per_node 2 fairseq-train --cpu``
(gloo) with ``--moe-expert-parallel-size 2`` against one process with the same global batch.

One process with ``--update-freq 2`` sees batches (0, 1), (2, 3), ... per update; two ranks
with ``--update-freq 1`` see the same pairs (fairseq shards batches round-robin). Dropout is 0,
so both runs compute the same sums; they differ only by float summation order, which Adam
amplifies for near-zero gradients. Tolerances: per-update loss and gradient norm equal to the
logged 3 decimals; parameters within 1e-4 after 6 updates (Adam steps are ~1e-3 here).
Validation uses 9 batches, so rank 1 runs a dummy batch: it must not hang and must give the
same valid loss.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import BIN, MOE_TINY, TINY_TRANSLATION, USER_DIR, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TOL_PARAM = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_flags(data, save_dir, gating, max_update, update_freq):
    return [
        str(data), "--user-dir", USER_DIR, "--task", "translation",
        "--arch", "adaptive_moe_transformer_tiny", "--share-all-embeddings",
        "--moe-gating", gating, "--criterion", "adaptive_moe_label_smoothed_cross_entropy",
        "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "1e-3",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
        "--dropout", "0", "--attention-dropout", "0", "--max-tokens", "1024",
        "--batch-size-valid", "7", "--max-update", str(max_update), "--update-freq", str(update_freq),
        "--clip-norm", "0.1", "--cpu", "--seed", "1", "--save-dir", str(save_dir),
        "--no-epoch-checkpoints", "--log-format", "json", "--log-interval", "1",
        "--num-workers", "0", "--required-batch-size-multiple", "1",
    ]


def torchrun(*args, nproc=2, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           str(BIN / "fairseq-train"), *map(str, args)]
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun fairseq-train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def records(log: str, kind: str):
    tag = f"| {kind} | "
    return [json.loads(line.split(tag, 1)[1]) for line in log.splitlines() if tag in line]


def model(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def runs(m30k_bin, tmp_path_factory):
    """For top2 and adaptive: 6 updates in one process and under P=2 (legacy_ddp)."""
    out = {}
    for gating in ("adaptive", "top2"):
        root = tmp_path_factory.mktemp(f"ep-{gating}")
        single = run_cli("fairseq-train", *train_flags(m30k_bin, root / "one", gating, 6, 2),
                         "--ddp-backend", "legacy_ddp")
        sharded = torchrun(*train_flags(m30k_bin, root / "ep2", gating, 6, 1),
                           "--moe-expert-parallel-size", "2", "--ddp-backend", "legacy_ddp")
        out[gating] = {"root": root, "one": single.stdout + single.stderr,
                       "ep2": sharded.stdout + sharded.stderr}
    return out


def consolidate(*args):
    return run_cli("adaptive-moe-consolidate", *args)


@pytest.mark.parametrize("gating", ["adaptive", "top2"])
def test_two_ranks_match_one_process(runs, gating):
    run = runs[gating]
    root = run["root"]
    one, ep2 = records(run["one"], "train_inner"), records(run["ep2"], "train_inner")
    assert [r["num_updates"] for r in one] == [str(u) for u in range(1, 7)]
    for a, b in zip(one, ep2, strict=True):
        for key in ("loss", "nll_loss", "gnorm", "moe_2x", "wpb", "bsz"):
            assert a[key] == b[key], (key, a, b)
    assert records(run["one"], "valid")[-1]["valid_loss"] == records(run["ep2"], "valid")[-1]["valid_loss"]

    assert sorted(p.name for p in (root / "ep2").glob("checkpoint_last*.pt")) == \
        ["checkpoint_last-ep0.pt", "checkpoint_last-ep1.pt"]
    shard0 = model(root / "ep2" / "checkpoint_last-ep0.pt")
    assert shard0["encoder.layers.0.moe.experts.fc1_weight"].shape[0] == 2  # 4 experts / P=2
    consolidate(root / "ep2" / "checkpoint_last.pt", "--out", root / "merged.pt", "--force")
    reference, merged = model(root / "one" / "checkpoint_last.pt"), model(root / "merged.pt")
    assert list(reference) == list(merged)
    gap = max((reference[k] - merged[k]).abs().max().item() for k in reference)
    assert gap <= TOL_PARAM, gap


def test_all_to_all_bytes_are_logged_and_adaptive_sends_less(runs):
    sent = {g: [float(r["moe_a2a_mb"]) for r in records(runs[g]["ep2"], "train_inner")]
            for g in ("adaptive", "top2")}
    assert all(mb > 0 for mbs in sent.values() for mb in mbs)
    assert "moe_a2a_mb" not in records(runs["adaptive"]["one"], "train_inner")[0]
    # the wait at the all-to-all, per update, and the ranks' work imbalance beside it
    ep2 = records(runs["adaptive"]["ep2"], "train_inner")
    assert all(float(r["moe_a2a_wait_ms"]) >= 0 for r in ep2)
    assert all(1.0 <= float(r["moe_rank_imbalance"]) <= 2.0 for r in ep2)
    assert "moe_a2a_wait_ms" not in records(runs["adaptive"]["one"], "train_inner")[0]
    # update 1 starts from the same weights and batch in both runs: adaptive's slots are a
    # subset of top-2's, so it sends fewer rows
    assert sent["adaptive"][0] < sent["top2"][0]


def test_consolidate_and_reshard_round_trip_is_bitwise(runs, tmp_path):
    root = runs["adaptive"]["root"]
    src = root / "ep2" / "checkpoint_last.pt"
    consolidate(src, "--out", tmp_path / "one.pt")
    consolidate(tmp_path / "one.pt", "--out", tmp_path / "again.pt", "--expert-parallel-size", "2")
    for r in range(2):
        a = model(root / "ep2" / f"checkpoint_last-ep{r}.pt")
        b = model(tmp_path / f"again-ep{r}.pt")
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    consolidate(tmp_path / "one.pt", "--out", tmp_path / "four.pt", "--expert-parallel-size", "4")
    assert model(tmp_path / "four-ep3.pt")["decoder.layers.1.moe.experts.fc2_bias"].shape[0] == 1
    consolidate(tmp_path / "four.pt", "--out", tmp_path / "back.pt")
    a, b = model(tmp_path / "one.pt"), model(tmp_path / "back.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(tmp_path / "again-ep1.pt", map_location="cpu", weights_only=False)
    assert state["cfg"]["model"].moe_expert_parallel_size == 2
    assert state["last_optimizer_state"] is None


def test_consolidated_checkpoint_generates_like_one_process(runs, m30k_bin):
    root = runs["adaptive"]["root"]
    merged = root / "generate.pt"
    consolidate(root / "ep2" / "checkpoint_last.pt", "--out", merged)

    def hypotheses(path):
        out = run_cli("fairseq-generate", m30k_bin, "--user-dir", USER_DIR, "--path", path,
                      "--gen-subset", "test", "--cpu", "--beam", "4", "--max-len-b", "20",
                      "--batch-size", "16", "--required-batch-size-multiple", "1").stdout
        return sorted(line.split("\t")[0] + "\t" + line.split("\t")[2]
                      for line in out.splitlines() if line.startswith("H-"))

    one = hypotheses(root / "one" / "checkpoint_last.pt")
    assert len(one) == 60
    assert hypotheses(merged) == one


def test_stop_and_resume_under_two_ranks(runs, m30k_bin, tmp_path):
    save = tmp_path / "resume"
    flags = ["--moe-expert-parallel-size", "2", "--ddp-backend", "legacy_ddp"]
    torchrun(*train_flags(m30k_bin, save, "adaptive", 3, 1), *flags)
    resumed = torchrun(*train_flags(m30k_bin, save, "adaptive", 6, 1), *flags)
    log = resumed.stdout + resumed.stderr
    assert "checkpoint_last-ep0.pt (epoch 1 @ 3 updates)" in log
    assert [r["num_updates"] for r in records(log, "train_inner")] == ["4", "5", "6"]
    for r in range(2):  # the same 6 updates as the uninterrupted run, optimizer state included
        a = model(save / f"checkpoint_last-ep{r}.pt")
        b = model(runs["adaptive"]["root"] / "ep2" / f"checkpoint_last-ep{r}.pt")
        gap = max((a[k] - b[k]).abs().max().item() for k in a)
        assert gap <= 1e-6, (r, gap)


def descendants(pid: int) -> list:
    """Every live descendant of ``pid`` (Linux /proc), deepest last."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_kill_and_resume_under_two_ranks(runs, m30k_bin, tmp_path):
    """SIGKILL a P=2 run once both shards of update 4 are on disk, restore that step, train on to
    6 updates: the same parameters as the uninterrupted run."""
    save = tmp_path / "killed"
    flags = ["--moe-expert-parallel-size", "2", "--ddp-backend", "legacy_ddp"]
    args = train_flags(m30k_bin, save, "adaptive", 1000, 1) + flags + [
        "--save-interval-updates", "2", "--keep-interval-updates", "10", "--disable-validation"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                             str(free_port()), str(BIN / "fairseq-train"), *map(str, args)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step4 = [save / f"checkpoint_1_4-ep{r}.pt" for r in range(2)]
    try:
        deadline = time.time() + 240
        while not all(p.exists() for p in step4):
            assert proc.poll() is None, "the run ended before it was killed"
            assert time.time() < deadline, "no step-4 checkpoint within 240 s"
            time.sleep(0.1)
    finally:  # torchrun starts its workers in sessions of their own: kill each process
        for pid in descendants(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    resumed = torchrun(*train_flags(m30k_bin, save, "adaptive", 6, 1), *flags,
                       "--restore-file", save / "checkpoint_1_4.pt")
    log = resumed.stdout + resumed.stderr
    assert "checkpoint_1_4-ep0.pt (epoch 1 @ 4 updates)" in log
    assert [r["num_updates"] for r in records(log, "train_inner")] == ["5", "6"]
    for r in range(2):
        a = model(save / f"checkpoint_last-ep{r}.pt")
        b = model(runs["adaptive"]["root"] / "ep2" / f"checkpoint_last-ep{r}.pt")
        gap = max((a[k] - b[k]).abs().max().item() for k in a)
        assert gap <= 1e-6, (r, gap)


def test_shards_of_different_steps_are_refused(runs, m30k_bin, tmp_path):
    """Shards left by a run killed between two ranks' saves: one line, no training."""
    src = runs["adaptive"]["root"] / "ep2"
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "start-ep0.pt").write_bytes((src / "checkpoint_last-ep0.pt").read_bytes())
    (mixed / "start-ep1.pt").write_bytes((runs["top2"]["root"] / "ep2" / "checkpoint_last-ep1.pt").read_bytes())
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(BIN / "fairseq-train"),
                           *map(str, train_flags(m30k_bin, tmp_path / "save", "adaptive", 8, 1)),
                           "--moe-expert-parallel-size", "2", "--ddp-backend", "legacy_ddp",
                           "--restore-file", str(mixed / "start.pt")],
                          env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode != 0
    assert "error: the checkpoint shards loaded for" in proc.stderr
    assert '"num_updates": "7"' not in proc.stdout + proc.stderr  # it never trained


def test_update_freq_accumulates_expert_grads_exactly(m30k_bin, tmp_path):
    """Expert gradients are reduced once per update, after the last micro-batch; with
    --update-freq 2 under P=2 the accumulated update must still equal one process with
    --update-freq 4."""
    single = run_cli("fairseq-train", *train_flags(m30k_bin, tmp_path / "one", "adaptive", 3, 4))
    sharded = torchrun(*train_flags(m30k_bin, tmp_path / "ep2", "adaptive", 3, 2),
                       "--moe-expert-parallel-size", "2", "--ddp-backend", "legacy_ddp")
    one = records(single.stdout + single.stderr, "train_inner")
    ep2 = records(sharded.stdout + sharded.stderr, "train_inner")
    assert len(one) == 3
    for a, b in zip(one, ep2, strict=True):
        assert (a["loss"], a["gnorm"], a["bsz"]) == (b["loss"], b["gnorm"], b["bsz"]), (a, b)


@pytest.mark.parametrize("size, message", [
    ("3", "error: --moe-expert-parallel-size 3 must divide --moe-expert-count 4"),
    ("2", "error: --moe-expert-parallel-size 2 must divide the world size 1"),
])
def test_bad_expert_parallel_size_fails_cleanly(m30k_bin, tmp_path, size, message):
    save = tmp_path / "never"
    proc = run_cli("fairseq-train", *train_flags(m30k_bin, save, "adaptive", 1, 1),
                   "--moe-expert-parallel-size", size, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-800:]
    assert "Traceback" not in proc.stderr
    assert not save.exists()


@pytest.mark.parametrize("flags, named", [
    ({"ddp_backend": "fully_sharded"}, "--ddp-backend fully_sharded"),
    ({"ddp_backend": "pytorch_ddp"}, "--ddp-backend pytorch_ddp"),
    ({"ddp_backend": "c10d"}, "--ddp-backend c10d"),
    ({"fp16": True}, "--fp16-no-flatten-grads"),
    ({"eval_bleu": True}, "--eval-bleu"),
    ({"moe_expert_parallel_size": 0}, "must be >= 1"),
])
def test_unsupported_settings_are_refused(flags, named, monkeypatch):
    from argparse import Namespace

    from fairseq_adaptive_moe.distributed import ExpertParallelError, check_args

    monkeypatch.setenv("WORLD_SIZE", "2")
    args = Namespace(moe_expert_parallel_size=2, moe_expert_count=4, ddp_backend="legacy_ddp")
    check_args(args)  # the base case is fine
    with pytest.raises(ExpertParallelError, match=named.replace("-", r"\-")):
        check_args(Namespace(**{**vars(args), **flags}))


def test_generate_on_a_shard_says_to_consolidate(runs, m30k_bin):
    shard = runs["top2"]["root"] / "ep2" / "checkpoint_last-ep0.pt"
    proc = run_cli("fairseq-generate", m30k_bin, "--user-dir", USER_DIR, "--path", shard,
                   "--gen-subset", "test", "--cpu", "--max-sentences", "4", check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --moe-expert-parallel-size 2") and "adaptive-moe-consolidate" in last, \
        proc.stderr[-800:]
    assert "Traceback" not in proc.stderr


def test_consolidate_refuses_bad_input(runs, tmp_path):
    root = runs["top2"]["root"] / "ep2"
    proc = run_cli("adaptive-moe-consolidate", tmp_path / "missing.pt", "--out", tmp_path / "o.pt",
                   check=False)
    assert proc.returncode == 2 and "no checkpoint found" in proc.stderr
    (tmp_path / "o.pt").write_text("keep me")
    proc = run_cli("adaptive-moe-consolidate", root / "checkpoint_last.pt", "--out",
                   tmp_path / "o.pt", check=False)
    assert proc.returncode == 2 and "exists; pass --force" in proc.stderr
    assert (tmp_path / "o.pt").read_text() == "keep me"
    # shards of two different runs do not belong together
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "c-ep0.pt").write_bytes((root / "checkpoint_last-ep0.pt").read_bytes())
    other = runs["adaptive"]["root"] / "ep2" / "checkpoint_last-ep1.pt"
    (mixed / "c-ep1.pt").write_bytes(other.read_bytes())
    proc = run_cli("adaptive-moe-consolidate", mixed / "c.pt", "--out", tmp_path / "m.pt", check=False)
    assert proc.returncode == 2 and "differs between" in proc.stderr, proc.stderr
    assert not (tmp_path / "m.pt").exists()


def test_replicated_shards_match_one_process(m30k_bin, tmp_path):
    """Four ranks, P = 2: two expert-parallel groups, each shard held by two replicas whose expert
    gradients are summed across the replica group; with --update-freq 2 the accumulated update
    must equal one process with --update-freq 8, parameters included."""
    single = run_cli("fairseq-train", *train_flags(m30k_bin, tmp_path / "one", "adaptive", 3, 8),
                     "--ddp-backend", "legacy_ddp")
    sharded = torchrun(*train_flags(m30k_bin, tmp_path / "ep", "adaptive", 3, 2),
                       "--moe-expert-parallel-size", "2", "--ddp-backend", "legacy_ddp", nproc=4,
                       timeout=600)
    one = records(single.stdout + single.stderr, "train_inner")
    ep = records(sharded.stdout + sharded.stderr, "train_inner")
    assert len(one) == 3
    for a, b in zip(one, ep, strict=True):
        assert (a["loss"], a["gnorm"], a["bsz"], a["moe_2x"]) == \
            (b["loss"], b["gnorm"], b["bsz"], b["moe_2x"]), (a, b)
    assert sorted(p.name for p in (tmp_path / "ep").glob("checkpoint_last*.pt")) == \
        ["checkpoint_last-ep0.pt", "checkpoint_last-ep1.pt"]  # one copy of each shard
    consolidate(tmp_path / "ep" / "checkpoint_last.pt", "--out", tmp_path / "merged.pt")
    reference, merged = model(tmp_path / "one" / "checkpoint_last.pt"), model(tmp_path / "merged.pt")
    gap = max((reference[k] - merged[k]).abs().max().item() for k in reference)
    assert gap <= TOL_PARAM, gap


def test_plain_data_parallel_resume_broadcasts_the_checkpoint(m30k_bin, tmp_path):
    """Without expert parallelism, rank 0 loads checkpoint_last.pt and fairseq broadcasts it to
    the other ranks, which unpickle it under torch's weights_only loading (fairseq's
    broadcast_object): the plugin allows the builtin types and fairseq's tensor placeholder that
    pickle holds, so a two-rank run resumes."""
    flags = [m30k_bin, *TINY_TRANSLATION, *MOE_TINY, "--ddp-backend", "legacy_ddp",
             "--save-dir", tmp_path / "ckpt"]
    torchrun(*flags, "--max-update", "2")
    log = torchrun(*flags, "--max-update", "4")
    text = log.stdout + log.stderr
    assert "Loaded checkpoint" in text and "@ 2 updates" in text
    assert [int(r["num_updates"]) for r in records(text, "train_inner")] == [3, 4]
