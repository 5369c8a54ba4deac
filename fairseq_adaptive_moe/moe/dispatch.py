"""Permute token slots into expert-sorted rows, and back.

Legend: (S) tokens, (K) candidate slots per token, (E) experts, (N = S*K) rows, (C) model dim.

Unused slots (padding, below threshold, over capacity) are keyed to a sentinel expert E, so
they sort after every real group. Two ways to treat them:

* trimmed (CPU): the rows are cut to the used ones. Reading the count is a host read, which
  costs nothing where the host is the device, and no work is spent on unused slots.
* static (accelerators): every slot keeps a row, so sizes are static and the plan needs no host
  sync; the unused rows are masked with ``where`` (never multiplied by zero), not computed on.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .routing import RoutingDecision


@dataclass
class DispatchPlan:
    """How to move S*K slots into expert order.

    slot_of_row:   (N,) long, the flat slot (token * K + rank) each sorted row holds
    row_of_slot:   (S*K,) long, each slot's row; >= ``num_rows`` for unused slots when trimmed
    expert_of_row: (N,) long, the expert of each sorted row; E for unused slots
    valid_row:     (N,) bool, rows that belong to a real expert (all of them when trimmed)
    counts:        (E,) long, rows per expert
    offsets:       (E,) int32, cumulative group ends (``grouped_mm``'s ``offs``)
    trimmed:       whether N is the number of used slots (else S*K)
    """

    slot_of_row: Tensor
    row_of_slot: Tensor
    expert_of_row: Tensor
    valid_row: Tensor
    counts: Tensor
    offsets: Tensor
    slots_per_token: int
    trimmed: bool

    @property
    def num_rows(self) -> int:
        return self.slot_of_row.shape[0]

    @property
    def token_of_row(self) -> Tensor:
        return self.slot_of_row // self.slots_per_token

    def row_block(self, start: int, stop: int) -> "DispatchPlan":
        """The sorted rows [start, stop) of a trimmed plan as a plan of their own, for computing
        the experts block by block: group ends shifted and clipped to the block (static, no host
        read). Its ``row_of_slot`` is empty: a block is for expert compute, not for combining."""
        assert self.trimmed, "row blocks are cut from trimmed plans"
        ends = self.offsets.long().clamp(start, stop) - start
        expert_of_row = self.expert_of_row[start:stop]
        return DispatchPlan(self.slot_of_row[start:stop], self.row_of_slot.new_empty(0),
                            expert_of_row, self.valid_row[start:stop],
                            torch.diff(ends, prepend=ends.new_zeros(1)), ends.to(torch.int32),
                            self.slots_per_token, True)


def plan(decision: RoutingDecision, trim: bool = False) -> DispatchPlan:
    num_experts = decision.num_experts
    k = decision.expert_index.shape[1]
    keyed = torch.where(decision.used, decision.expert_index, num_experts).reshape(-1)  # (N,)
    slot_of_row = torch.argsort(keyed, stable=True)
    row_of_slot = torch.empty_like(slot_of_row)
    row_of_slot[slot_of_row] = torch.arange(slot_of_row.numel(), device=keyed.device)
    expert_of_row = keyed[slot_of_row]
    # group ends by binary search in the sorted keys: static shapes, no host sync (CUDA
    # ``bincount`` reads the max key on the host), no atomics
    experts = torch.arange(num_experts, device=keyed.device)
    ends = torch.searchsorted(expert_of_row, experts, right=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    offsets = ends.to(torch.int32)
    if trim:
        used = int(offsets[-1])
        slot_of_row, expert_of_row = slot_of_row[:used], expert_of_row[:used]
    return DispatchPlan(slot_of_row, row_of_slot, expert_of_row, expert_of_row < num_experts,
                        counts, offsets, k, trim)


def permute(x: Tensor, p: DispatchPlan) -> Tensor:
    """(S, C) tokens -> (N, C) expert-sorted rows; unused rows (static plans) are 0."""
    rows = x.index_select(0, p.token_of_row)
    if p.trimmed:
        return rows
    return torch.where(p.valid_row.unsqueeze(-1), rows, rows.new_zeros(()))


def unpermute_combine(rows: Tensor, p: DispatchPlan, decision: RoutingDecision) -> Tensor:
    """(N, C) expert outputs -> (S, C): gather each slot's row through the inverse permutation
    and sum the slots with their combine weights. A gather, not ``index_add_``: no atomics.

    Unused slots must read a zero row: a trimmed plan points them past the end, at an appended
    zero row; a static plan's unused rows are already 0 (``ExpertFFN`` masks them)."""
    num_tokens, k = decision.used.shape
    index = p.row_of_slot
    if p.trimmed:
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        index = index.clamp_max(p.num_rows)
    slots = rows.index_select(0, index).view(num_tokens, k, -1)  # (S, K, C)
    weight = decision.weight.to(slots.dtype).unsqueeze(-1)
    return (slots * weight).sum(dim=1)
