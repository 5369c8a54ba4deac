"""The per-expert loop: the plain definition of an MoE layer's expert computation.

``loop_moe`` computes ``out[s] = sum_k weight[s, k] * FFN_{expert[s, k]}(x[s])`` over the used
slots with nothing but indexing and one pair of matmuls per expert. It shares no code with
:mod:`.dispatch` and :mod:`.experts`' grouped path, so it is the oracle the fast path is checked
against, forward and backward (the tests, and ``adaptive-moe-bench`` before it times anything),
and the naive baseline the bench times as ``loop``.
"""

from torch import Tensor

from .experts import ExpertFFN
from .routing import RoutingDecision


def loop_moe(x: Tensor, decision: RoutingDecision, experts: ExpertFFN) -> Tensor:
    """(S, d) -> (S, d): the experts' combined output for ``decision``, one expert at a time.

    Slots are grouped by expert with a stable sort, group sizes are read on the host
    (``.tolist()``), and each expert's weights come from ``unbind(0)`` (indexing ``W[e]`` in a
    loop would allocate a full-size zero gradient per expert in backward). Activation dropout is
    not applied. Tokens with no used slot get 0.
    """
    num_tokens, k = decision.used.shape
    num_experts = experts.num_experts
    keyed = decision.expert_index.masked_fill(~decision.used, num_experts).reshape(-1)
    order = keyed.argsort(stable=True)
    sizes = keyed.bincount(minlength=num_experts + 1).tolist()
    weight = decision.weight.reshape(-1)
    out = x.new_zeros(x.shape)
    act = experts.activation_fn
    params = zip(experts.fc1_weight.unbind(0), experts.fc1_bias.unbind(0),
                 experts.fc2_weight.unbind(0), experts.fc2_bias.unbind(0))
    start = 0
    for e, (w1, b1, w2, b2) in enumerate(params):
        n = sizes[e]
        if n:
            slots = order[start:start + n]
            tok = slots // k
            y = act(x.index_select(0, tok) @ w1 + b1) @ w2 + b2
            out.index_add_(0, tok, y * weight[slots].to(y.dtype).unsqueeze(-1))
        start += n
    return out
