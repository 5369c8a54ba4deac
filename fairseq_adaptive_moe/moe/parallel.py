"""Expert parallelism: experts sharded over the ranks of a process group, dropless all-to-all.

With a group of P ranks and E experts, rank r holds experts ``[r*E/P, (r+1)*E/P)``. Each rank
routes its own tokens over all E experts; the expert-sorted rows are then exchanged with
``all_to_all_single`` using variable split sizes, so only the slots really used travel (adaptive
gating sends fewer bytes than top-2), and nothing is dropped or padded.

Legend: (N) this rank's expert-sorted rows, (M) rows received for the local experts, (C) model
dim, (P) ranks, (El) experts per rank.

Without a group, or with a group of one rank, :class:`ExpertParallelExchange` is not used at all:
:class:`~fairseq_adaptive_moe.moe.layer.MoELayer` picks its path once, at construction.
"""

import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .dispatch import DispatchPlan


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable splits; backward sends the gradients back the same
    way (input and output splits swapped)."""

    @staticmethod
    def forward(ctx, x: Tensor, send: List[int], recv: List[int], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((sum(ctx.send),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all(x: Tensor, send: List[int], recv: List[int], group) -> Tensor:
    """Rows ``x`` split as ``send`` (one count per rank) -> rows received, split as ``recv``."""
    return _AllToAll.apply(x, send, recv, group)


@dataclass
class ExchangeStats:
    """Rows this rank sent to other ranks (not to itself) in one forward, and how long it waited
    at the split-size exchange (s): the first collective of the layer, where a rank that
    arrives early waits for the last one."""

    rows_sent: int
    bytes_sent: int
    wait_s: float = 0.0


class ExpertParallelExchange:
    """Moves expert-sorted rows to the ranks that hold their experts and the results back."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.world != 0:
            raise ValueError(f"expert count {num_experts} is not divisible by the expert-parallel "
                             f"size {self.world}")
        self.num_local = num_experts // self.world
        self.last_wait_s = 0.0  # the last forward's ExchangeStats.wait_s

    def local_experts(self) -> range:
        return range(self.rank * self.num_local, (self.rank + 1) * self.num_local)

    def __call__(self, rows: Tensor, plan: DispatchPlan, compute):
        """rows (N, C), sorted by global expert, trimmed to used slots -> ((N, C) expert outputs,
        ExchangeStats). ``compute(rows, local_plan)`` runs the local experts on rows sorted by
        local expert."""
        assert plan.trimmed, "expert parallelism exchanges only used slots (a trimmed plan)"
        counts = plan.counts.view(self.world, self.num_local)  # (P, El): my rows per expert
        recv_counts = torch.empty_like(counts)
        start = time.perf_counter()
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.group)
        send = counts.sum(1).tolist()  # one host read of the split sizes: all_to_all needs them
        recv = recv_counts.sum(1).tolist()
        wait = time.perf_counter() - start  # the host read waits for it: no sync of our own

        received = all_to_all(rows, send, recv, self.group)  # (M, C): by source rank, then expert
        local_expert = torch.repeat_interleave(
            torch.arange(self.num_local, device=rows.device).repeat(self.world),
            recv_counts.reshape(-1))
        order = torch.argsort(local_expert, stable=True)
        local_counts = recv_counts.sum(0)
        local_plan = _local_plan(local_expert[order], local_counts)
        out_sorted = compute(received.index_select(0, order), local_plan)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = out_sorted.index_select(0, inverse)  # back to (source rank, expert) order
        remote = sum(send) - send[self.rank]
        stats = ExchangeStats(remote, remote * rows.shape[1] * rows.element_size(), wait)
        return all_to_all(out, recv, send, self.group), stats


def _local_plan(expert_of_row: Tensor, counts: Tensor) -> DispatchPlan:
    rows = torch.arange(expert_of_row.numel(), device=expert_of_row.device)
    return DispatchPlan(rows, rows, expert_of_row, torch.ones_like(expert_of_row, dtype=torch.bool),
                        counts, counts.cumsum(0).to(torch.int32), 1, True)


def expert_parallel_exchange(group: Optional[object], num_experts: int) -> Optional[ExpertParallelExchange]:
    """The exchange for ``group``; None (the local path) without a group or with one rank."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size(group) == 1:
        return None
    return ExpertParallelExchange(group, num_experts)
