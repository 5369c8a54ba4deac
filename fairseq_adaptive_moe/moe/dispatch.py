"""Permute token slots into expert-sorted rows, and back.

Legend: (S) tokens, (K) candidate slots per token, (E) experts, (N = S*K) rows, (C) model dim.

Every slot gets a row; unused slots (padding, below threshold, over capacity) are keyed to a
sentinel expert E, so they sort after every real group and are masked, never computed on. The
plan needs no host sync: all sizes are static, and group ends live on the device.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .routing import RoutingDecision


@dataclass
class DispatchPlan:
    """How to move S*K slots into expert order.

    slot_of_row:   (N,) long, the flat slot (token * K + rank) each sorted row holds
    row_of_slot:   (N,) long, inverse permutation of ``slot_of_row``
    expert_of_row: (N,) long, the expert of each sorted row; E for unused slots
    valid_row:     (N,) bool, rows that belong to a real expert
    counts:        (E,) long, rows per expert
    offsets:       (E,) int32, cumulative group ends (``grouped_mm``'s ``offs``)
    """

    slot_of_row: Tensor
    row_of_slot: Tensor
    expert_of_row: Tensor
    valid_row: Tensor
    counts: Tensor
    offsets: Tensor
    slots_per_token: int

    @property
    def token_of_row(self) -> Tensor:
        return self.slot_of_row // self.slots_per_token


def plan(decision: RoutingDecision) -> DispatchPlan:
    num_experts = decision.num_experts
    k = decision.expert_index.shape[1]
    keyed = torch.where(decision.used, decision.expert_index, num_experts).reshape(-1)  # (N,)
    slot_of_row = torch.argsort(keyed, stable=True)
    row_of_slot = torch.empty_like(slot_of_row)
    row_of_slot[slot_of_row] = torch.arange(slot_of_row.numel(), device=keyed.device)
    expert_of_row = keyed[slot_of_row]
    counts = torch.bincount(keyed, minlength=num_experts + 1)[:num_experts]
    offsets = counts.cumsum(0).to(torch.int32)
    return DispatchPlan(
        slot_of_row, row_of_slot, expert_of_row, expert_of_row < num_experts, counts, offsets, k
    )


def permute(x: Tensor, p: DispatchPlan) -> Tensor:
    """(S, C) tokens -> (N, C) expert-sorted rows; unused rows are 0 (masked with ``where``)."""
    rows = x.index_select(0, p.token_of_row)
    return torch.where(p.valid_row.unsqueeze(-1), rows, rows.new_zeros(()))


def unpermute_combine(rows: Tensor, p: DispatchPlan, decision: RoutingDecision) -> Tensor:
    """(N, C) expert outputs -> (S, C): gather each slot's row through the inverse permutation
    and sum the slots with their combine weights. A gather, not ``index_add_``: no atomics."""
    num_tokens, k = decision.used.shape
    slots = rows.index_select(0, p.row_of_slot).view(num_tokens, k, -1)  # (S, K, C)
    slots = torch.where(decision.used.unsqueeze(-1), slots, slots.new_zeros(()))
    weight = decision.weight.to(slots.dtype).unsqueeze(-1)
    return (slots * weight).sum(dim=1)
