"""Expert parallelism in fairseq training: ``--moe-expert-parallel-size P``.

The W ranks of a fairseq run form W/P *expert-parallel groups* of P consecutive ranks
(``[0..P-1]``, ``[P..2P-1]``, ...). Inside a group, rank ``r`` (its place in the group, global
rank mod P) holds experts ``[r*E/P, (r+1)*E/P)`` of every MoE layer, and tokens travel to their
experts by the dropless all-to-all of :class:`~fairseq_adaptive_moe.moe.parallel.ExpertParallelExchange`.
The ranks holding the same experts (one per group) form a *replica group* of W/P ranks.

Where the state lives: :func:`setup` returns this process's :class:`ExpertParallelState` (its
place and process groups) and :func:`shard_parameters` attaches it to every expert parameter, as
``param.expert_parallel``, beside fairseq's ``param.expert`` tag. Whatever needs it later (the
fairseq patches of :mod:`.fairseq_patches`, checkpoint checks) finds it on the model with
:func:`state_of`; a model without it is trained exactly as fairseq trains it.

What fairseq gets from this module, and why (the patches themselves, and the fairseq internals
they change, are listed in :mod:`.fairseq_patches`):

* **Gradients.** Expert parameters carry fairseq's ``param.expert`` tag, so ``--ddp-backend
  legacy_ddp`` (alias ``no_c10d``) does not all-reduce them. The other backends are refused:
  c10d/pytorch_ddp would average the different shards of a group's ranks as if they were one
  tensor (and fairseq's c10d wrapper cannot run on CPU at all: it passes ``device_ids``);
  fully_sharded and slowmo shard or average differently again.
  Their gradient is instead summed over the replica group and divided by W, right after
  legacy_ddp's own reduction of the shared gradients (:func:`reduce_expert_grads`, called once
  per update, after the last ``--update-freq`` micro-batch), in one coalesced all-reduce. fairseq
  divides shared gradients by W the same way (DDP averages, then the trainer multiplies by
  ``W / sample_size``), so every parameter ends with ``sum of per-token gradients / sample_size``,
  as in one process.
* **Clipping.** fairseq's ``clip_grad_norm_`` leaves ``expert`` gradients out of the norm. Under
  expert parallelism the norm is the true global one, ``sqrt(|shared|^2 + sum over the P shards
  of |local experts|^2)``, the same on every rank (:func:`expert_grad_sq_norm`).
* **Checkpoints.** Ranks ``0..P-1`` (the first group) each save their own file, the checkpoint name
  plus ``-ep{r}`` (``checkpoint_last-ep0.pt``, ...), holding the shared parameters, their experts
  and their optimizer state. Every rank loads the file of its own shard, so resuming under the same
  P works as usual. After loading, the ranks compare their update counts and shared parameters
  (:func:`check_shards_agree`): shards of different steps, left by a run killed between two ranks'
  saves, are refused with one line. ``adaptive-moe-consolidate`` merges the shards (or re-shards
  to another P).
* **Launching on CPU.** fairseq's torchrun support divides by the number of GPUs; under
  ``torchrun ... fairseq-train --cpu`` the rank, world size and gloo backend are taken from
  torchrun's environment instead (:func:`configure_cpu_torchrun`).

Validation stays in lockstep because fairseq pads every rank's shard of batches to the same
length with dummy batches, and a dummy batch runs the full forward (its loss is multiplied by 0).
Beam search does not: its number of decoder steps depends on the data. Generation therefore runs
on a consolidated checkpoint, and ``--eval-bleu`` during expert-parallel training is refused.

This module needs torch only; fairseq is imported by :mod:`.fairseq_patches` alone.
"""

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..errors import AdaptiveMoEError, MoEConfigError

logger = logging.getLogger(__name__)

SUPPORTED_DDP_BACKENDS = ("legacy_ddp", "no_c10d")
TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
STATE_ATTR = "expert_parallel"  # param.expert_parallel: the ExpertParallelState of a shard


def shard_suffix(ep_rank: int) -> str:
    """What a rank's checkpoint file adds to fairseq's name: ``checkpoint_last-ep1.pt``."""
    return f"-ep{ep_rank}"


@dataclass(frozen=True)
class ExpertParallelState:
    """This process's place in expert parallelism (immutable; shared by every expert parameter).

    size:          P, ranks sharing one copy of the experts
    world:         W, all ranks
    rank:          place in the expert-parallel group (global rank mod P): which shard it holds
    group:         the P ranks of this rank's expert-parallel group
    replica_group: the W/P ranks holding the same shard (None when W == P)
    """

    size: int
    world: int
    rank: int
    group: Any
    replica_group: Optional[Any]

    @property
    def replicas(self) -> int:
        return self.world // self.size

    def __deepcopy__(self, memo):  # a copied model is in the same process: same groups
        return self


class ExpertParallelError(MoEConfigError):
    """A configuration expert parallelism cannot run; the message names the flag."""


class ShardMismatchError(AdaptiveMoEError):
    """The checkpoint shards the ranks loaded are not of one training step."""


def parallel_size(cfg) -> int:
    """``--moe-expert-parallel-size`` of a config or namespace; 1 where it is not set (older
    checkpoints, models without the flag)."""
    size = cfg.get("moe_expert_parallel_size") if isinstance(cfg, dict) else \
        getattr(cfg, "moe_expert_parallel_size", None)
    return 1 if size is None else int(size)


def _world_size(args) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return int(getattr(args, "distributed_world_size", 1) or 1)


def check_args(args) -> None:
    """Raise :class:`ExpertParallelError` for a P that cannot run with these flags."""
    size = parallel_size(args)
    if size < 1:
        raise ExpertParallelError(f"--moe-expert-parallel-size must be >= 1, got {size}")
    if size == 1:
        return
    experts = args.moe_expert_count
    if experts % size != 0:
        raise ExpertParallelError(
            f"--moe-expert-parallel-size {size} must divide --moe-expert-count {experts}")
    world = _world_size(args)
    if world % size != 0:
        raise ExpertParallelError(
            f"--moe-expert-parallel-size {size} must divide the world size {world}"
            + ("; this model is sharded over ranks: merge it with adaptive-moe-consolidate "
               "to use it in one process" if world == 1 else ""))
    backend = getattr(args, "ddp_backend", None)
    if backend is not None and backend not in SUPPORTED_DDP_BACKENDS:
        raise ExpertParallelError(
            f"--ddp-backend {backend} is not supported with --moe-expert-parallel-size (it would "
            f"average the ranks' different expert shards); use --ddp-backend legacy_ddp")
    if getattr(args, "fp16", False) and not getattr(args, "memory_efficient_fp16", False) \
            and not getattr(args, "fp16_no_flatten_grads", False):
        raise ExpertParallelError(
            "--fp16 flattens all gradients into one buffer and loses which are expert-sharded; "
            "add --fp16-no-flatten-grads, or use --amp or --memory-efficient-fp16 with "
            "--moe-expert-parallel-size")
    if getattr(args, "eval_bleu", False):
        raise ExpertParallelError(
            "--eval-bleu runs beam search, whose steps differ between ranks and would hang the "
            "expert all-to-all; drop it with --moe-expert-parallel-size and score a "
            "consolidated checkpoint instead")
    if getattr(args, "zero_sharding", "none") not in (None, "none"):
        raise ExpertParallelError("--zero-sharding is not supported with --moe-expert-parallel-size")


def configure_launch(args) -> None:
    """At start-up, on the full fairseq namespace: settings expert parallelism needs.

    Every rank loads its own checkpoint shard (``--load-checkpoint-on-all-dp-ranks``), instead of
    rank 0 loading one file and broadcasting it.
    """
    configure_cpu_torchrun(args)
    if parallel_size(args) > 1 and hasattr(args, "load_checkpoint_on_all_dp_ranks"):
        args.load_checkpoint_on_all_dp_ranks = True


def configure_cpu_torchrun(args) -> None:
    """``torchrun --nproc_per_node N fairseq-train ... --cpu``: take rank and world size from
    torchrun's environment and use gloo.

    fairseq's own inference of a torchrun launch computes ``rank % torch.cuda.device_count()``
    (a division by zero without GPUs) and skips distributed training altogether when
    ``--distributed-world-size`` was left at its CPU default of 1.
    """
    if not getattr(args, "cpu", False) or not all(k in os.environ for k in TORCHRUN_ENV):
        return
    if not hasattr(args, "distributed_init_method") or args.distributed_init_method is not None:
        return
    world = int(os.environ["WORLD_SIZE"])
    if world <= 1:
        return
    args.distributed_init_method = "env://"
    args.distributed_world_size = world
    args.distributed_rank = int(os.environ["RANK"])
    args.distributed_no_spawn = True
    args.device_id = int(os.environ.get("LOCAL_RANK", 0))
    if getattr(args, "distributed_backend", "gloo") != "gloo":
        args.distributed_backend = "gloo"


# Process groups are collective objects: torch.distributed.new_group must be called by every rank,
# in the same order, and each group holds its connections for the life of the process. They are
# therefore made once per process and P and shared by every MoE layer of every model built in the
# process (e.g. fairseq-generate's ensemble). This cache of immutable states is the package's only
# module-level state; an entry made under an earlier default group (torch.distributed destroyed
# and initialised again) is not reused.
_GROUPS: Dict[int, tuple] = {}


def setup(size: int) -> Optional[ExpertParallelState]:
    """The :class:`ExpertParallelState` of this process for P = ``size``, its process groups made
    on first use (every rank makes every group, in the same order, as
    ``torch.distributed.new_group`` requires). None for ``size == 1``."""
    if size <= 1:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ExpertParallelError(
            f"--moe-expert-parallel-size {size} needs distributed training (torchrun, or "
            "fairseq's --distributed-world-size); to use a sharded model in one process, merge it "
            "with adaptive-moe-consolidate")
    world_group = dist.group.WORLD
    cached = _GROUPS.get(size)
    if cached is not None and cached[0] is world_group:
        return cached[1]
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size != 0:
        raise ExpertParallelError(
            f"--moe-expert-parallel-size {size} must divide the world size {world}")
    group = replica_group = None
    for start in range(0, world, size):
        ranks = list(range(start, start + size))
        g = dist.new_group(ranks)
        if rank in ranks:
            group = g
    if world > size:
        for ep_rank in range(size):
            ranks = list(range(ep_rank, world, size))
            g = dist.new_group(ranks)
            if rank % size == ep_rank:
                replica_group = g
    state = ExpertParallelState(size, world, rank % size, group, replica_group)
    _GROUPS[size] = (world_group, state)
    logger.info(f"expert parallelism: {size} ranks per expert group, {world // size} "
                f"replica(s) of each expert; this rank holds shard {rank % size}")
    return state


def shard_parameters(module: torch.nn.Module, state: ExpertParallelState) -> None:
    """Mark a module's parameters as this rank's expert shard: fairseq's ``param.expert`` tag
    (legacy_ddp leaves them alone, fairseq's clipping leaves them out of its norm) and
    ``param.expert_parallel = state``, which the fairseq patches read (:func:`state_of`)."""
    for p in module.parameters():
        p.expert = True
        setattr(p, STATE_ATTR, state)


def state_of(module: torch.nn.Module) -> Optional[ExpertParallelState]:
    """The expert-parallel state a model's expert shards carry, or None for a model without
    expert parallelism (plain fairseq behaviour)."""
    for p in module.parameters():
        state = getattr(p, STATE_ATTR, None)
        if state is not None:
            return state
    return None


def _sharded(module: torch.nn.Module, state: ExpertParallelState) -> list:
    """The expert-sharded parameters of ``state``, in the module's parameter order (the same on
    every rank)."""
    return [p for p in module.parameters() if getattr(p, STATE_ATTR, None) is state]


def reduce_expert_grads(module: torch.nn.Module, state: ExpertParallelState) -> None:
    """Sum the expert-shard gradients over the replica group (one coalesced all-reduce) and divide
    them by the world size. Every rank passes the same parameters in the same order; a gradient
    that is missing (an expert no token reached) counts as zero, as legacy_ddp does."""
    params = [p for p in _sharded(module, state) if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    if state.replica_group is not None:
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=state.replica_group)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)
    for g in grads:
        g.div_(state.world)


def expert_grad_sq_norm(module: torch.nn.Module, state: ExpertParallelState) -> Optional[torch.Tensor]:
    """``sum over the P shards of |expert gradients|^2`` (fp32), the same on every rank of the
    expert-parallel group: the term fairseq's clipping norm leaves out. None when this rank has
    no expert gradient (then no collective runs, on any rank: they all hold the same layers)."""
    grads = [p.grad for p in _sharded(module, state) if p.grad is not None]
    if not grads:
        return None
    local = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in grads]).sum()
    dist.all_reduce(local, group=state.group)  # each expert once: the P shards of one group
    return local


def check_shards_agree(model: torch.nn.Module, num_updates: int, filename: str) -> None:
    """After every rank loaded its shard: all ranks must hold the same update count and the same
    shared parameters. A run killed between two ranks' saves leaves shards of different steps;
    loading them would train on silently mixed weights. Raises :class:`ShardMismatchError`."""
    shared = [p.detach() for p in model.parameters() if not hasattr(p, "expert")]
    fingerprint = torch.stack([p.double().sum() for p in shared]).sum() if shared else torch.zeros((), dtype=torch.float64)
    mine = torch.stack([torch.tensor(float(num_updates), dtype=torch.float64, device=fingerprint.device),
                        fingerprint])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if any(not torch.equal(t, every[0]) for t in every):
        updates = [int(t[0].item()) for t in every]
        raise ShardMismatchError(
            f"the checkpoint shards loaded for {filename} do not belong together (updates per "
            f"rank: {updates}; a run stopped while saving?); restore one step that every shard has, "
            "e.g. --restore-file SAVE_DIR/checkpoint_EPOCH_UPDATES.pt")
