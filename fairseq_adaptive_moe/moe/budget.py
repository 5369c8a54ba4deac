"""A compute budget for adaptive gating: adjust each layer's threshold T so that the share of
its tokens that take two (or more) experts tracks a target S.

The controller is integral control on ``log T``, applied every ``interval`` updates::

    share = multi / tokens                      (over the updates since the last step, all ranks)
    error = clamp((S - share) / min(S, 1 - S), -1, 1)
    T    <- clamp(T * exp(gain * error), min_threshold, max_threshold)

Why this form:

* **Integral, so the mean is exact.** Summing the update over k steps (no clipping) gives
  ``mean(S - share) = min(S, 1 - S) * (log T_k - log T_0) / (gain * k)``: whatever the gate does,
  the mean share over a window misses S only by how far ``log T`` moved across it. A
  proportional term would add noise and no accuracy; the share is monotone in T, so there is no
  sign to get wrong.
* **In log T, because the share is a CDF of the gap.** A token takes two experts iff
  ``p1 - p2 <= T``, so ``share(T)`` is the distribution function of the gap ``p1 - p2``. Gaps
  span decades (near-uniform gates at initialisation, confident gates later; S = 0.01 needs T
  near the 1st percentile), and a multiplicative step moves T by the same fraction at any scale.
* **The error relative to the budget.** Near a small S the share grows about in proportion to
  T (``d share / d log T ~ S``), near S close to 1 the untouched tail shrinks the same way, so an
  absolute error would make the loop ``1 / min(S, 1 - S)`` times slower at S = 0.01 than at
  S = 0.5. Dividing by ``min(S, 1 - S)`` makes the loop gain about ``gain`` at any S; clipping
  to +-1 bounds a step to a factor ``e^{gain}`` while far from the target (at the start, the
  share of a fresh gate is far from S). The default gain 0.5 keeps the loop gain below 1 (T
  settles without oscillating) with room for gates steeper than the proportional case.
* **Counts, not a running mean.** ``tokens`` and ``multi`` are summed (over micro-batches and,
  through one all-reduce per forward, over data-parallel ranks) in a buffer of the gate, so every
  rank holds the same counts and the same T, and a checkpoint holds them exactly: stop and
  resume give the same thresholds as an uninterrupted run.

Everything stays on the device: the counts are added to a buffer and T is updated from it with
tensor operations, so no step reads a value back to the host.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import MoEConfigError


class BudgetConfigError(MoEConfigError):
    """A bad budget option; ``option`` is the :class:`BudgetConfig` field's name."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class BudgetConfig:
    """The two-expert budget of a gate (see the module docstring).

    target:         S, the share of non-padding tokens that may take 2+ experts, 0 < S < 1
    gain:           step of ``log T`` per unit of relative share error
    interval:       updates between two controller steps (the counts cover them all)
    min_threshold:  lower bound of T (> 0: the controller works on log T)
    max_threshold:  upper bound of T (1.0 with softmax probabilities: every token 2 experts)
    warmup_updates: T stays at its starting value for the first N updates (their tokens are
                    not counted)
    freeze_after:   T stops changing after N updates (0 = never)
    """

    target: float
    gain: float = 0.5
    interval: int = 1
    min_threshold: float = 1e-6
    max_threshold: float = 1.0
    warmup_updates: int = 0
    freeze_after: int = 0

    def check(self, threshold: float) -> None:
        """Raise :class:`BudgetConfigError` naming the first bad field; ``threshold`` is the
        starting T (``"threshold"`` in the error)."""
        checks = [
            ("target", 0 < self.target < 1, f"must be between 0 and 1 (exclusive), got {self.target}"),
            ("gain", 0 < self.gain < math.inf, f"must be > 0, got {self.gain}"),
            ("interval", self.interval >= 1, f"must be >= 1, got {self.interval}"),
            ("min_threshold", 0 < self.min_threshold < math.inf,
             f"must be > 0 (the controller works on log T), got {self.min_threshold}"),
            ("max_threshold", self.min_threshold < self.max_threshold < math.inf,
             f"must be above the minimum {self.min_threshold}, got {self.max_threshold}"),
            ("warmup_updates", self.warmup_updates >= 0, f"must be >= 0, got {self.warmup_updates}"),
            ("freeze_after", self.freeze_after >= 0, f"must be >= 0 (0 = never), got {self.freeze_after}"),
            ("threshold", self.min_threshold <= threshold <= self.max_threshold,
             f"must be within the budget's bounds [{self.min_threshold:g}, {self.max_threshold:g}] "
             f"(it is the starting T), got {threshold}"),
        ]
        for option, ok, message in checks:
            if not ok:  # also catches NaN
                raise BudgetConfigError(option, f"{option} {message}")

    def observes(self, num_updates: int) -> bool:
        """Whether the tokens of update ``num_updates + 1`` (0-based ``num_updates``) count."""
        return num_updates >= self.warmup_updates and (
            self.freeze_after == 0 or num_updates < self.freeze_after)

    def steps(self, num_updates: int) -> bool:
        """Whether the controller steps once ``num_updates`` updates are done."""
        return num_updates > 0 and num_updates % self.interval == 0 and (
            self.freeze_after == 0 or num_updates <= self.freeze_after)


def adjust_threshold(threshold: Tensor, counts: Tensor, cfg: BudgetConfig) -> Tensor:
    """One controller step: the new T from T (0-d) and ``counts`` = (tokens, multi).

    ``T * exp(gain * clamp((S - multi / tokens) / min(S, 1 - S), -1, 1))`` clamped to the
    bounds; T is kept when no token was counted. Pure tensor operations (no host read)."""
    tokens, multi = counts[0], counts[1]
    share = multi / tokens.clamp_min(1)
    error = ((cfg.target - share) / min(cfg.target, 1 - cfg.target)).clamp(-1, 1)
    stepped = (threshold.log() + cfg.gain * error).exp()
    stepped = stepped.clamp(cfg.min_threshold, cfg.max_threshold)
    return torch.where(tokens > 0, stepped, threshold)


def count_tokens(used: Tensor, token_mask: Tensor, group=None) -> Tensor:
    """(2,) float32 on the device: (non-padding tokens, tokens using 2+ experts) of one routing
    decision, summed over the ranks of ``group`` (default: every rank, when torch.distributed is
    initialised; nothing to reduce in one process)."""
    counts = torch.stack([token_mask.sum(), (used.sum(dim=-1) >= 2).sum()]).float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    return counts


def budget_from_options(target: Optional[float], **options) -> Optional[BudgetConfig]:
    """A :class:`BudgetConfig`, or None when ``target`` is None (no budget)."""
    return None if target is None else BudgetConfig(target=target, **options)
