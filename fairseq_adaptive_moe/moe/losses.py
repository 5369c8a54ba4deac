"""Auxiliary router losses. Pure functions of a :class:`RoutingDecision`.

Padding tokens (``token_mask`` False) are excluded from every sum and mean here.
"""

import torch
from torch import Tensor

from .routing import RoutingDecision

BALANCE_TOKENS = ("single", "first")


def balance_loss(decision: RoutingDecision, tokens: str = "single") -> Tensor:
    """Load-balancing loss on top-1 decisions only (paper Eq. 4)::

        L = E * sum_e f1_e * p_e

    ``p_e`` is the mean gate probability of expert e over all tokens (differentiable).
    ``f1_e`` is the fraction of the top-1-routed tokens whose expert is e (no gradient):

    * ``tokens="single"`` (default, the paper's reading): the top-1-routed tokens are those that
      took exactly one expert. Two-expert tokens do not enter ``f1``. If no token took a single
      expert (e.g. top-2, or T >= 1), ``f1`` is all zero and so is the loss.
    * ``tokens="first"`` (GShard/tutel): every token's first choice counts.

    Either way ``f1`` is read from the first choice alone, so changing only the second choices
    leaves the loss unchanged. Equals 1 when routing and probabilities are both uniform.
    """
    if tokens not in BALANCE_TOKENS:
        raise ValueError(f"unknown balance tokens {tokens!r}; expected one of {BALANCE_TOKENS}")
    probs, mask = decision.probs, decision.token_mask
    num_experts = probs.shape[-1]
    maskf = mask.to(probs.dtype)
    n_tokens = maskf.sum().clamp_min(1.0)
    p_mean = (probs * maskf.unsqueeze(-1)).sum(0) / n_tokens  # (E,)

    counted = mask
    if tokens == "single":
        counted = counted & (decision.experts_per_token == 1)
    first = decision.expert_index[:, 0]
    f1 = torch.zeros(num_experts, dtype=probs.dtype, device=probs.device)
    f1.index_add_(0, first, counted.to(probs.dtype))
    f1 = f1 / counted.sum().clamp_min(1).to(probs.dtype)
    return num_experts * (f1.detach() * p_mean).sum()


def z_loss(decision: RoutingDecision) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): ``mean_s logsumexp(logits_s)^2`` over tokens."""
    lse = torch.logsumexp(decision.logits, dim=-1)
    maskf = decision.token_mask.to(lse.dtype)
    return (lse.square() * maskf).sum() / maskf.sum().clamp_min(1.0)
