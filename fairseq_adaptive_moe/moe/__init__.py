"""Mixture-of-experts in plain PyTorch (no fairseq import): gating, dispatch, experts, losses."""

from .budget import BudgetConfig, adjust_threshold
from .experts import ExpertFFN
from .layer import (EVAL_GATING, GateConfigError, MoELayer, MoEStats, TopKGate, check_gate_config,
                    eval_gating, gates)
from .losses import BALANCE_TOKENS, balance_loss, z_loss
from .routing import COMBINE_WEIGHTS, GATING_POLICIES, THRESHOLD_PROBS, RoutingDecision, route
from .timing import MoETimer

__all__ = [
    "BALANCE_TOKENS", "BudgetConfig", "COMBINE_WEIGHTS", "EVAL_GATING", "GATING_POLICIES", "THRESHOLD_PROBS",
    "ExpertFFN", "GateConfigError", "MoELayer", "MoETimer", "MoEStats", "RoutingDecision", "TopKGate",
    "adjust_threshold", "balance_loss", "check_gate_config", "eval_gating", "gates", "route", "z_loss",
]
