"""The MoE layer: route -> dispatch -> compute -> combine, returning ``(output, MoEStats)``."""

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import MoEConfigError
from . import dispatch
from .budget import BudgetConfig, BudgetConfigError, adjust_threshold, count_tokens
from .experts import ExpertFFN, autocast_off
from .losses import BALANCE_TOKENS, balance_loss, z_loss
from .parallel import expert_parallel_exchange
from .routing import COMBINE_WEIGHTS, GATING_POLICIES, THRESHOLD_PROBS, RoutingDecision, route

EVAL_GATING = ("train",) + GATING_POLICIES


@dataclass
class MoEStats:
    """What one MoE layer did in one forward. All tensors stay on the device (no host sync).

    balance_loss:      ()  paper Eq. 4 over top-1 decisions (see ``losses.balance_loss``),
                           computed from ``routing`` when first read (a decoding step that
                           nobody trains on never pays for it)
    z_loss:            ()  router z-loss, the same way
    num_tokens:        ()  non-padding tokens routed
    num_multi:         ()  tokens that used 2+ experts
    expert_load:       (E,) slots processed by each expert
    dropped_slots:     ()  slots lost to ``capacity_factor`` (0 when dropless)
    experts_per_token: input shape without the feature dim; experts each token used (0 = pad)
    routing:           the layer's RoutingDecision, rows in the input's flattened token order
                       (for analysis tools: experts chosen and gate probabilities per token)
    bytes_sent:        bytes of token rows this rank sent to other ranks (expert parallelism;
                       0 on the local path), the way there only
    a2a_wait_s:        seconds this rank spent at the layer's first all-to-all (the split
                       sizes), waiting for the other ranks (expert parallelism; 0 otherwise)
    threshold:         ()  the T this forward routed with, when a two-expert budget sets it
                       (None otherwise)
    """

    name: str
    num_tokens: Tensor
    num_multi: Tensor
    expert_load: Tensor
    dropped_slots: Tensor
    experts_per_token: Tensor
    routing: RoutingDecision
    bytes_sent: int = 0
    threshold: Optional[Tensor] = None
    a2a_wait_s: float = 0.0
    expert_parallel: bool = False  # whether the layer exchanged rows with other ranks
    balance_tokens: str = "single"  # which tokens the balance loss counts (``BALANCE_TOKENS``)

    @functools.cached_property
    def balance_loss(self) -> Tensor:
        return balance_loss(self.routing, self.balance_tokens)

    @functools.cached_property
    def z_loss(self) -> Tensor:
        return z_loss(self.routing)

    @property
    def multi_fraction(self) -> Tensor:
        return self.num_multi.float() / self.num_tokens.clamp_min(1).float()

    @property
    def load_imbalance(self) -> Tensor:
        """max_e load_e / mean_e load_e: 1.0 is perfectly balanced, E is one expert taking all."""
        load = self.expert_load.float()
        return load.max() / load.mean().clamp_min(1e-9)


class TopKGate(nn.Module):
    """Linear gate d -> E (no bias), logits and softmax in fp32, then a gating policy.

    ``policy`` routes while training; ``eval_policy`` ("train" = the same) routes otherwise
    (the paper evaluates with top-1).

    ``budget`` (adaptive gating only) makes T a buffer that a controller adjusts so that the share
    of tokens taking 2+ experts tracks ``budget.target`` (:mod:`.budget`). ``threshold`` is then
    the starting T. Two buffers hold the state, saved in checkpoints: ``budget_threshold`` (T)
    and ``budget_counts`` (tokens, multi-expert tokens counted since the last controller step,
    summed over ranks). The controller steps in :meth:`set_num_updates`, which fairseq calls at
    the start of every update; other training loops call it with the number of updates done.
    ``budget_group`` is the process group whose ranks share T (default: all ranks).
    """

    def __init__(self, embed_dim: int, num_experts: int, policy: str = "adaptive",
                 threshold: float = 0.1, max_experts: int = 2, eval_policy: str = "train",
                 capacity_factor: float = 0.0, threshold_probs: str = "softmax",
                 combine_weights: str = "softmax", budget: Optional[BudgetConfig] = None,
                 budget_group=None):
        super().__init__()
        check_gate_config(num_experts, policy, threshold, max_experts, eval_policy,
                          capacity_factor, threshold_probs, combine_weights, budget)
        self.wg = nn.Linear(embed_dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.policy, self.eval_policy = policy, eval_policy
        self.threshold, self.max_experts = threshold, max_experts
        self.capacity_factor = capacity_factor
        self.threshold_probs, self.combine_weights = threshold_probs, combine_weights
        self.budget, self.budget_group = budget, budget_group
        self._budget_seen: Optional[int] = None  # the update count of the last set_num_updates
        self._budget_observing = True
        if budget is not None:
            self.register_buffer("budget_threshold", torch.tensor(float(threshold)))
            self.register_buffer("budget_counts", torch.zeros(2))

    def routing_threshold(self):
        """The T routing uses: the budget's buffer (a 0-d tensor on the device, never read back
        to the host), else the fixed ``threshold``."""
        return self.threshold if self.budget is None else self.budget_threshold

    def current_threshold(self) -> float:
        """T as a number, for reports (reads the buffer back to the host)."""
        return float(self.routing_threshold())

    def set_num_updates(self, num_updates: int) -> None:
        """Called with the number of updates done before each training forward (fairseq calls
        it once per micro-batch; only the first call of an update acts). Once every
        ``budget.interval`` updates, steps T with the counts gathered since the last step and
        clears them. Device operations only."""
        if self.budget is None or num_updates == self._budget_seen:
            return
        self._budget_seen = num_updates
        self._budget_observing = self.budget.observes(num_updates)
        if num_updates % self.budget.interval:
            return
        with torch.no_grad():
            if self.budget.steps(num_updates):
                self.budget_threshold.copy_(
                    adjust_threshold(self.budget_threshold, self.budget_counts, self.budget))
            self.budget_counts.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints without the budget's buffers (older, upcycled, consolidated before the
        budget existed, or trained without one) load with T = ``threshold``; a checkpoint's
        buffers loaded into a gate without a budget are ignored (T is ``--moe-threshold``)."""
        names = ("budget_threshold", "budget_counts")
        if self.budget is None:
            for name in names:
                state_dict.pop(prefix + name, None)
        else:
            state_dict.setdefault(prefix + "budget_threshold", torch.tensor(float(self.threshold)))
            state_dict.setdefault(prefix + "budget_counts", torch.zeros(2))
            self._budget_seen = None  # the next set_num_updates steps on the loaded counts
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def active_policy(self) -> str:
        if self.training or self.eval_policy == "train":
            return self.policy
        return self.eval_policy

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Slots per expert, ``ceil(capacity_factor * S / E)``; None when dropless."""
        if self.capacity_factor <= 0:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens / self.num_experts))

    def forward(self, x: Tensor, token_mask: Optional[Tensor] = None) -> RoutingDecision:
        with autocast_off(x.device.type):  # fp32 also under --amp
            logits = nn.functional.linear(x.float(), self.wg.weight.float())  # (S, E) fp32
        decision = route(logits, self.active_policy(), self.routing_threshold(), self.max_experts,
                         token_mask, self.threshold_probs, self.combine_weights,
                         self.capacity(x.shape[0]))
        if self.budget is not None and self.training and self._budget_observing:
            with torch.no_grad():
                self.budget_counts.add_(count_tokens(decision.used, decision.token_mask,
                                                     self.budget_group))
        return decision

    def extra_repr(self) -> str:
        return (f"policy={self.policy}, eval_policy={self.eval_policy}, threshold={self.threshold}, "
                f"max_experts={self.max_experts}, capacity_factor={self.capacity_factor}"
                + ("" if self.budget is None else f", budget={self.budget}"))


class GateConfigError(MoEConfigError):
    """A bad gate option; ``option`` is the constructor argument's name."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def check_gate_config(num_experts: int, policy: str, threshold: float, max_experts: int,
                      eval_policy: str = "train", capacity_factor: float = 0.0,
                      threshold_probs: str = "softmax", combine_weights: str = "softmax",
                      budget: Optional[BudgetConfig] = None) -> None:
    """Raise :class:`GateConfigError` naming the offending option (a budget field's error
    is named ``budget.<field>``, the starting T ``threshold``)."""
    checks = [
        ("num_experts", num_experts >= 1, f"must be >= 1, got {num_experts}"),
        ("policy", policy in GATING_POLICIES, f"must be one of {GATING_POLICIES}, got {policy!r}"),
        ("eval_policy", eval_policy in EVAL_GATING,
         f"must be one of {EVAL_GATING}, got {eval_policy!r}"),
        ("threshold", threshold >= 0, f"must be >= 0, got {threshold}"),
        ("max_experts", 1 <= max_experts <= num_experts,
         f"must be between 1 and the expert count ({num_experts}), got {max_experts}"),
        ("policy", policy != "top2" or num_experts >= 2,
         f"top2 needs at least 2 experts, got {num_experts}"),
        ("eval_policy", eval_policy != "top2" or num_experts >= 2,
         f"top2 needs at least 2 experts, got {num_experts}"),
        ("capacity_factor", capacity_factor >= 0,
         f"must be >= 0 (0 = dropless), got {capacity_factor}"),
        ("threshold_probs", threshold_probs in THRESHOLD_PROBS,
         f"must be one of {THRESHOLD_PROBS}, got {threshold_probs!r}"),
        ("combine_weights", combine_weights in COMBINE_WEIGHTS,
         f"must be one of {COMBINE_WEIGHTS}, got {combine_weights!r}"),
    ]
    for option, ok, message in checks:
        if not ok:  # also catches NaN
            raise GateConfigError(option, f"{option} {message}")
    if budget is None:
        return
    if policy != "adaptive":
        raise GateConfigError("budget.target", f"budget.target needs adaptive gating (a "
                              f"threshold to adjust), got policy {policy!r}")
    if max_experts < 2:
        raise GateConfigError("budget.target", "budget.target needs max_experts >= 2 (no token "
                              f"can take two experts), got {max_experts}")
    try:
        budget.check(threshold)
    except BudgetConfigError as e:
        option = "threshold" if e.option == "threshold" else f"budget.{e.option}"
        raise GateConfigError(option, f"{option} {str(e).split(' ', 1)[1]}") from None


def gates(module: nn.Module) -> List[TopKGate]:
    """Every :class:`TopKGate` in ``module`` (itself included), in module order."""
    return [m for m in module.modules() if isinstance(m, TopKGate)]


@contextmanager
def eval_gating(module: nn.Module, policy: str) -> Iterator[List[TopKGate]]:
    """Within the block, every gate in ``module`` routes with ``policy`` when not training
    (``"train"``: each gate's own training policy); afterwards each gets back its own
    ``eval_policy``. Yields the gates (an empty list for a dense model).

    Validation uses it to compute the loss under the training gating, and under top-1, whatever
    eval gating the model was built with (the eval policy is otherwise fixed when the model is
    built, e.g. by ``--moe-eval-gating``). Training-mode forwards are not affected. Raises
    :class:`GateConfigError` for an unknown policy, or ``top2`` with a one-expert gate."""
    found = gates(module)
    for gate in found:
        check_gate_config(gate.num_experts, gate.policy, gate.threshold, gate.max_experts, policy)
    saved = [gate.eval_policy for gate in found]
    try:
        for gate in found:
            gate.eval_policy = policy
        yield found
    finally:
        for gate, previous in zip(found, saved):
            gate.eval_policy = previous


class MoELayer(nn.Module):
    """A mixture-of-experts FFN: ``(x, padding_mask) -> (y, MoEStats)``.

    x is (..., C); ``padding_mask`` (same leading shape, True = pad) keeps padding out of routing,
    compute, statistics and losses: a pad position uses no expert and its output is 0.
    """

    def __init__(self, gate: TopKGate, experts: ExpertFFN, name: str = "moe",
                 balance_tokens: str = "single", group=None):
        super().__init__()
        if balance_tokens not in BALANCE_TOKENS:
            raise ValueError(f"balance tokens must be one of {BALANCE_TOKENS}, got {balance_tokens!r}")
        self.gate, self.experts = gate, experts
        self.name = name
        self.balance_tokens = balance_tokens
        # expert parallelism: chosen once here; None is the local path (no group, or one rank)
        self.exchange = expert_parallel_exchange(group, gate.num_experts)
        expected = gate.num_experts if self.exchange is None else self.exchange.num_local
        if experts.num_experts != expected:
            raise ValueError(f"{name}: {experts.num_experts} local experts, expected {expected}")

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, MoEStats]:
        lead, embed_dim = x.shape[:-1], x.shape[-1]
        tokens = x.reshape(-1, embed_dim)  # (S, C)
        token_mask = None if padding_mask is None else ~padding_mask.reshape(-1)

        decision = self.gate(tokens, token_mask)  # 1. route
        out, plan, bytes_sent = self.apply_experts(tokens, decision)
        stats = self.stats(decision, plan, lead)
        stats.bytes_sent = bytes_sent
        if self.exchange is not None:
            stats.a2a_wait_s = self.exchange.last_wait_s
            stats.expert_parallel = True
        return out.view(*lead, embed_dim).to(x.dtype), stats

    def apply_experts(self, tokens: Tensor, decision: RoutingDecision, trim: Optional[bool] = None):
        """Steps 2-4 for (S, C) tokens and a given decision -> ((S, C) output, DispatchPlan,
        bytes sent to other ranks).

        ``trim`` (default: on CPU) computes only the used slots' rows; otherwise every slot keeps
        a row and sizes stay static (no host sync), see :mod:`dispatch`."""
        if trim is None:
            trim = tokens.device.type == "cpu" or self.exchange is not None
        plan = dispatch.plan(decision, trim=trim)  # 2. dispatch
        rows = dispatch.permute(tokens, plan)
        bytes_sent = 0
        if self.exchange is None:
            rows = self.experts(rows, plan)  # 3. compute
        else:  # 3. compute on the ranks holding the experts, all-to-all there and back
            rows, exchanged = self.exchange(rows, plan, self.experts)
            bytes_sent = exchanged.bytes_sent
            self.exchange.last_wait_s = exchanged.wait_s
        return dispatch.unpermute_combine(rows, plan, decision), plan, bytes_sent  # 4. combine

    def stats(self, decision: RoutingDecision, plan: dispatch.DispatchPlan, lead) -> MoEStats:
        per_token = decision.experts_per_token
        mask = decision.token_mask
        if self.gate.capacity_factor > 0:
            wanted = route(decision.logits, self.gate.active_policy(), self.gate.routing_threshold(),
                           self.gate.max_experts, mask, self.gate.threshold_probs).used
            dropped = wanted.sum() - decision.used.sum()
        else:
            dropped = per_token.new_zeros(())
        return MoEStats(
            name=self.name,
            num_tokens=mask.sum(),
            num_multi=(per_token >= 2).sum(),
            expert_load=plan.counts,
            dropped_slots=dropped,
            experts_per_token=per_token.view(lead),
            routing=decision,
            threshold=(self.gate.budget_threshold.detach().clone()
                       if self.gate.budget is not None and self.gate.active_policy() == "adaptive"
                       else None),
            balance_tokens=self.balance_tokens,
        )
