"""Gating policies: which experts each token uses, and with what weight.

Legend: (S) tokens, (E) experts, (K) candidate slots per token (ranked by gate probability).

Every policy is a pure function of the gate logits, so tests can build logits by hand and check
each decision exactly. ``route`` returns a :class:`RoutingDecision`; everything downstream
(dispatch, losses, statistics) reads only that record.

Which probabilities are compared, and which weights are combined
----------------------------------------------------------------
``p`` is the softmax of the gate logits over *all* E experts, computed in fp32.

* Threshold (``threshold_probs``):

  - ``"softmax"`` (default): the candidate of rank j (1-based) is used iff ``p_1 - p_j <= T``,
    with ``p`` the full softmax above. The paper's adaptive gating is the case K = 2.
  - ``"renormalized"``: the same test on the top-K candidates' probabilities renormalized to sum
    to 1, ``q_j = p_j / sum_{i<=K} p_i``. This is the other reading of the paper's "we normalize
    the expert probability": the test becomes relative to the candidates' mass.

* Combine weights (``combine_weights``):

  - ``"softmax"`` (default): a used expert is weighted by its own ``p_j``. A single-expert token
    gets ``p_1`` (Switch Transformer), a two-expert token ``p_1`` and ``p_2``. The gate receives a
    task-loss gradient from every token, so the top-1 baseline trains its router too.
  - ``"renormalized"``: the used experts' ``p_j`` are divided by their sum, so they add to 1
    (GShard/DeepSpeed top-2). A single-expert token then gets weight 1.0, and its gate learns only
    from the balance and z losses.

Tokens excluded by ``token_mask`` (padding) use no expert and get weight 0.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

GATING_POLICIES = ("top1", "top2", "adaptive")
THRESHOLD_PROBS = ("softmax", "renormalized")
COMBINE_WEIGHTS = ("softmax", "renormalized")


@dataclass
class RoutingDecision:
    """What the gate decided for S tokens.

    expert_index: (S, K) long, candidate experts, best first
    used:         (S, K) bool, whether the token is sent to that candidate
    weight:       (S, K) float32, combine weight, 0 where unused
    probs:        (S, E) float32, softmax gate probabilities
    logits:       (S, E) float32, gate logits (for the z-loss)
    token_mask:   (S,)   bool, tokens that count (not padding)
    """

    expert_index: Tensor
    used: Tensor
    weight: Tensor
    probs: Tensor
    logits: Tensor
    token_mask: Tensor

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def experts_per_token(self) -> Tensor:
        """(S,) long: how many experts each token uses (0 for padding)."""
        return self.used.sum(dim=-1)


def candidate_count(policy: str, max_experts: int) -> int:
    """K, the number of ranked candidates a policy may use."""
    if policy == "top1":
        return 1
    if policy == "top2":
        return 2
    if policy == "adaptive":
        return max_experts
    raise ValueError(f"unknown gating policy {policy!r}; expected one of {GATING_POLICIES}")


def route(
    logits: Tensor,
    policy: str,
    threshold: Union[float, Tensor] = 0.1,
    max_experts: int = 2,
    token_mask: Optional[Tensor] = None,
    threshold_probs: str = "softmax",
    combine_weights: str = "softmax",
    capacity: Optional[int] = None,
) -> RoutingDecision:
    """Route S tokens given their gate logits (S, E).

    * ``top1``: every token uses its first expert.
    * ``top2``: every token uses its first two experts.
    * ``adaptive``: the candidate of rank j <= ``max_experts`` is used iff ``p_1 - p_j <= T``
      (paper §3.1: a token takes two experts iff ``p_1 - p_2 <= T``). T = 0 routes as top-1
      (up to exact ties), and T >= 1 uses all ``max_experts`` candidates. T may be a 0-d
      tensor on the logits' device (a two-expert budget's T, :mod:`.budget`): it is compared
      there, never read back to the host.

    ``capacity`` (None = dropless) caps the slots each expert takes. Slots are admitted in
    GShard's priority order, all first choices before any second choice, and in token order
    within a rank; the rest are dropped (``used`` False) before the combine weights are computed.
    """
    if threshold_probs not in THRESHOLD_PROBS:
        raise ValueError(f"unknown threshold_probs {threshold_probs!r}; expected {THRESHOLD_PROBS}")
    if combine_weights not in COMBINE_WEIGHTS:
        raise ValueError(f"unknown combine_weights {combine_weights!r}; expected {COMBINE_WEIGHTS}")
    num_tokens, num_experts = logits.shape
    k = min(candidate_count(policy, max_experts), num_experts)
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)  # (S, K), descending

    if token_mask is None:
        token_mask = torch.ones(num_tokens, dtype=torch.bool, device=logits.device)
    if policy == "adaptive":
        ranked = top_p
        if threshold_probs == "renormalized":
            ranked = top_p / top_p.sum(dim=-1, keepdim=True)
        gap = (ranked[:, :1] - ranked).detach()
        used = gap <= threshold
        used[:, 0] = True  # the first choice is always used, also when T < 0 slips through
    else:
        used = torch.ones_like(top_p, dtype=torch.bool)
    used = used & token_mask.unsqueeze(-1)
    if capacity is not None:
        used = used & (position_in_expert(top_i, used, num_experts) < capacity)

    weight = torch.where(used, top_p, torch.zeros_like(top_p))
    if combine_weights == "renormalized":
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    return RoutingDecision(top_i, used, weight, probs, logits, token_mask)


def position_in_expert(expert_index: Tensor, used: Tensor, num_experts: int) -> Tensor:
    """(S, K) long: each used slot's arrival position at its expert (0-based).

    GShard's priority order: all first choices (K = 0) arrive before any second choice, and
    within a rank tokens arrive in order. A capacity limit keeps the slots whose position is
    below it (``route``), and a padded dispatch puts slot (s, k) in column ``position[s, k]`` of
    its expert's buffer. Unused slots do not count; their own entries are meaningless (mask
    them with ``used``).
    """
    rank_major = expert_index.t().reshape(-1)  # (K*S): all first choices, then all second ...
    one_hot = F.one_hot(rank_major, num_experts) * used.t().reshape(-1, 1)
    position = (one_hot.cumsum(0) - 1).gather(1, rank_major.unsqueeze(1)).squeeze(1)
    return position.view(expert_index.shape[1], -1).t()
