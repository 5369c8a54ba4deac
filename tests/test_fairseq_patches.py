"""The fairseq patches (``distributed.fairseq_patches.install``) and the one-line error boundary.

* In one process (each rank of a gloo world of 2), an expert-parallel model is built, then a plain
  one: the plain model's trainer behaves as unpatched fairseq (checkpoint names, saving ranks,
  gradient norm and clipping, legacy_ddp gradient reduction, checkpoint loading all equal to
  fairseq's own methods, kept behind the wrappers), while the expert-parallel one keeps its
  behaviour next to it. No module-level switch decides between them: the state rides on the
  expert parameters.
* ``install()`` is idempotent and refuses, in one line, a fairseq whose signatures moved.
* An uncaught error of the plugin prints ``error: <message>`` and exits 1, also through
  ``torch.multiprocessing`` (fairseq's one-process-per-GPU spawn).
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fairseq_adaptive_moe  # noqa: F401  (registers the plugin: install() has run)
from fairseq_adaptive_moe import errors
from fairseq_adaptive_moe.distributed import fairseq_patches
from fairseq_adaptive_moe.errors import MoEConfigError

from conftest import USER_DIR

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_dicts(folder) -> None:
    words = "".join(f"w{i} {100 - i}\n" for i in range(40))
    for lang in ("de", "en"):
        (folder / f"dict.{lang}.txt").write_text(words)


def make_trainer(data, rank, *flags):
    """A fairseq Trainer for adaptive_moe_transformer_tiny in this process (rank ``rank`` of the
    gloo world already initialised), built as fairseq-train builds it."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data), "--user-dir", USER_DIR, "--task", "translation", "-s", "de", "-t", "en",
        "--arch", "adaptive_moe_transformer_tiny", "--moe-expert-count", "4",
        "--criterion", "adaptive_moe_label_smoothed_cross_entropy", "--optimizer", "adam",
        "--lr", "1e-3", "--clip-norm", "0.1", "--cpu", "--max-tokens", "512",
        "--ddp-backend", "legacy_ddp", "--distributed-world-size", str(WORLD),
        "--distributed-rank", str(rank), "--seed", "1", *flags])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return Trainer(cfg, task, model, task.build_criterion(cfg.criterion))


def set_grads(model, rank, seed):
    """The same gradients for the same parameters on every call; different on each rank."""
    g = torch.Generator().manual_seed(seed + 1000 * rank)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def worker(rank, port, data, save_dir, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from fairseq import utils
        from fairseq_adaptive_moe.distributed import state_of

        fairseq_patches.install()
        fairseq = fairseq_patches.originals()
        suffix, should_save = fairseq["Trainer.checkpoint_suffix"], \
            fairseq["Trainer.should_save_checkpoint_on_current_rank"]
        clip, reduce = fairseq["Trainer.clip_grad_norm"], \
            fairseq["LegacyDistributedDataParallel.all_reduce_grads"]
        load = fairseq["Trainer.load_checkpoint"]
        checks = {}

        # 1. expert parallelism, P = 2: each rank its shard of the experts
        ep = make_trainer(data, rank, "--moe-expert-parallel-size", "2")
        ep_model = ep.get_model()
        checks["ep_state"] = state_of(ep_model) is not None
        checks["ep_suffix"] = ep.checkpoint_suffix == f"-ep{rank}" and suffix(ep) == ""
        checks["ep_saves_every_shard"] = ep.should_save_checkpoint_on_current_rank is True
        set_grads(ep_model, rank, 1)
        experts = [p for p in ep_model.parameters() if hasattr(p, "expert")]
        shared_sq = sum(p.grad.double().square().sum() for p in ep_model.parameters()
                        if not hasattr(p, "expert"))
        expert_sq = torch.stack([sum(p.grad.double().square().sum() for p in experts)])
        dist.all_reduce(expert_sq)  # both shards of the experts
        norm = ep.clip_grad_norm(0)
        checks["ep_global_norm"] = abs(norm.item() - (shared_sq + expert_sq[0]).sqrt().item()) < 1e-3
        set_grads(ep_model, rank, 2)
        before = [p.grad.clone() for p in experts]
        ep.model.all_reduce_grads()
        checks["ep_expert_grads_reduced"] = same([p.grad for p in experts], [g / WORLD for g in before])

        # 2. a plain model in the same process: fairseq's own behaviour, method by method
        plain = make_trainer(data, rank)
        model = plain.get_model()
        checks["plain_no_state"] = state_of(model) is None
        for p in model.encoder.layers[0].moe.experts.parameters():
            p.expert = True  # fairseq's own tag (as its base layers set it), without our state
        checks["plain_suffix"] = plain.checkpoint_suffix == suffix(plain) == ""
        checks["plain_saving_rank"] = \
            plain.should_save_checkpoint_on_current_rank == should_save(plain) == (rank == 0)
        for max_norm in (0.0, 0.1):  # 0: the norm only; 0.1: the norm and the clipping
            set_grads(model, rank, 3)
            ours = plain.clip_grad_norm(max_norm), grads(model)
            set_grads(model, rank, 3)
            theirs = clip(plain, max_norm), grads(model)
            checks[f"plain_clip_{max_norm}"] = torch.equal(ours[0], theirs[0]) and same(ours[1], theirs[1])
        set_grads(model, rank, 3)
        checks["plain_norm_is_utils"] = torch.equal(
            plain.clip_grad_norm(0), utils.clip_grad_norm_(list(model.parameters()), 0))
        legacy_ddp = plain.model.module  # ModuleProxyWrapper -> LegacyDistributedDataParallel
        set_grads(model, rank, 4)
        plain.model.all_reduce_grads()
        ours = grads(model)
        set_grads(model, rank, 4)
        reduce(legacy_ddp)
        checks["plain_ddp_reduction"] = same(ours, grads(model))
        path = os.path.join(save_dir, "plain.pt")
        plain.consolidate_optimizer()  # as fairseq's checkpoint_utils.save_checkpoint does first
        plain.save_checkpoint(path, {"marker": 7})
        dist.barrier()
        # every rank reads the file: fairseq's rank-0-then-broadcast path unpickles with torch's
        # weights_only default, which refuses the broadcast state under torch >= 2.6
        plain.cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True
        ours = plain.load_checkpoint(path), [p.detach().clone() for p in model.parameters()]
        theirs = load(plain, path), [p.detach().clone() for p in model.parameters()]
        checks["plain_load"] = ours[0]["marker"] == theirs[0]["marker"] == 7 and same(ours[1], theirs[1])

        # 3. and the expert-parallel trainer is unchanged by the plain one next to it
        checks["ep_still_sharded"] = ep.checkpoint_suffix == f"-ep{rank}"
        results[rank] = checks
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_expert_parallel_then_plain_model_in_one_process(tmp_path):
    write_dicts(tmp_path)
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), str(tmp_path), str(tmp_path), results), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        assert results[rank] == {k: True for k in results[rank]}, (rank, results[rank])


# ---- install() ---------------------------------------------------------------------------------

def test_install_is_idempotent():
    from fairseq.trainer import Trainer

    before = {name: getattr(fn, "__qualname__") for name, fn in fairseq_patches.originals().items()}
    fairseq_patches.install()
    hook = sys.excepthook  # ours now (torch.distributed may have wrapped an earlier one)
    fairseq_patches.install()
    getter = Trainer.checkpoint_suffix.fget
    assert getattr(getter, fairseq_patches.MARK) and not hasattr(getter.__wrapped__, fairseq_patches.MARK)
    assert {n: getattr(f, "__qualname__") for n, f in fairseq_patches.originals().items()} == before
    assert sys.excepthook is hook and getattr(hook, errors.EXCEPTHOOK_MARK, False)


def test_install_refuses_a_changed_signature_in_one_line(monkeypatch):
    from fairseq.distributed import LegacyDistributedDataParallel
    from fairseq.trainer import Trainer

    originals = fairseq_patches.originals()
    # an unpatched fairseq whose load_checkpoint gained an argument
    monkeypatch.setattr(LegacyDistributedDataParallel, "all_reduce_grads",
                        originals["LegacyDistributedDataParallel.all_reduce_grads"])

    def load_checkpoint(self, filename, strict, reset_optimizer=False):
        pass

    monkeypatch.setattr(Trainer, "load_checkpoint", load_checkpoint)
    with pytest.raises(fairseq_patches.FairseqPatchError) as info:
        fairseq_patches.install()
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "fairseq.trainer.Trainer.load_checkpoint(self, filename, strict, reset_optimizer=False)" in message
    # checked before anything changed
    assert LegacyDistributedDataParallel.all_reduce_grads is \
        originals["LegacyDistributedDataParallel.all_reduce_grads"]


def test_install_refuses_another_fairseq_version(monkeypatch):
    import fairseq

    monkeypatch.setattr(fairseq, "__version__", "0.13.0")
    with pytest.raises(fairseq_patches.FairseqPatchError, match=r"^fairseq 0\.13\.0 is not supported"):
        fairseq_patches.install()


# ---- the one-line boundary ---------------------------------------------------------------------

def test_excepthook_prints_one_line_for_plugin_errors_only(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: seen.append(exc[0]))
    errors.install_excepthook()
    errors.install_excepthook()  # idempotent: still one wrapper
    assert not getattr(sys.excepthook.previous, errors.EXCEPTHOOK_MARK, False)
    err = MoEConfigError("--moe-threshold must be >= 0, got -0.1")
    sys.excepthook(type(err), err, None)
    assert capsys.readouterr().err == "error: --moe-threshold must be >= 0, got -0.1\n"
    other = KeyError("x")
    sys.excepthook(type(other), other, None)
    assert seen == [KeyError] and capsys.readouterr().err == ""


def test_uncaught_error_exits_1_with_one_line(tmp_path):
    script = ("import sys; sys.modules['fairseq'] = None\n"  # the boundary needs no fairseq
              "from fairseq_adaptive_moe.errors import MoEConfigError, install_excepthook\n"
              "install_excepthook()\n"
              "raise MoEConfigError('--moe-freq must be >= 0, got -1')\n")
    proc = subprocess.run([sys.executable, "-c", script], text=True, capture_output=True,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.path.dirname(USER_DIR)))
    assert proc.returncode == 1
    assert proc.stderr == "error: --moe-freq must be >= 0, got -1\n"


def raise_in_child(rank):
    raise MoEConfigError(f"--moe-expert-parallel-size 3 must divide --moe-expert-count 4 (rank {rank})")


@pytest.mark.multiprocess
def test_one_line_through_torch_multiprocessing_spawn():
    """fairseq's one-process-per-GPU launch: the child's error reaches the parent as text."""
    with pytest.raises(Exception) as info:
        mp.spawn(raise_in_child, nprocs=1, join=True)
    assert type(info.value).__name__ == "ProcessRaisedException"
    assert errors.one_line(info.value) == \
        "--moe-expert-parallel-size 3 must divide --moe-expert-count 4 (rank 0)"
    assert errors.one_line(RuntimeError("x")) is None


def test_save_checkpoint_flushes_the_tasks_curriculum_rows_first():
    """Every rank passes through ``checkpoint_utils.save_checkpoint`` (the saving-rank check is
    inside it), so the wrapper flushes the task's pending curriculum rows there, on all ranks,
    before fairseq's own function runs; a task without the hook is passed through."""
    from types import SimpleNamespace

    from fairseq import checkpoint_utils

    wrapper = checkpoint_utils.save_checkpoint
    assert getattr(wrapper, fairseq_patches.MARK, False)
    calls = []
    original = fairseq_patches.originals()["checkpoint_utils.save_checkpoint"]
    fake = fairseq_patches._save_checkpoint(lambda cfg, trainer, itr, loss: calls.append("save")
                                            or "path")
    task = SimpleNamespace(flush_complexity=lambda: calls.append("flush"))
    assert fake(None, SimpleNamespace(task=task), None, 1.0) == "path"
    assert calls == ["flush", "save"]
    calls.clear()
    assert fake(None, SimpleNamespace(task=object()), None, 1.0) == "path" and calls == ["save"]
    assert original.__module__ == "fairseq.checkpoint_utils"
