"""Oracle tests for the plain-PyTorch MoE layer (no fairseq)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fairseq_adaptive_moe.moe import dispatch
from fairseq_adaptive_moe.moe import (
    ExpertFFN, GateConfigError, MoELayer, TopKGate, balance_loss, route, z_loss,
)
from fairseq_adaptive_moe.moe.reference import loop_moe


def logits_from_probs(rows):
    """Gate logits whose softmax is exactly the given probability rows."""
    p = torch.tensor(rows, dtype=torch.float32)
    return p.log()


def make_layer(num_experts=4, dim=8, ffn=16, policy="adaptive", seed=0, **gate_kwargs):
    torch.manual_seed(seed)
    gate = TopKGate(dim, num_experts, policy=policy, **gate_kwargs)
    experts = ExpertFFN(num_experts, dim, ffn, seed=seed)
    return MoELayer(gate, experts)


@pytest.fixture(params=[True, False], ids=["fold", "bias-add"])
def fold(request, monkeypatch):
    """Both ways of applying fc1's bias (``ExpertFFN.folds_bias``): folded into the GEMM (many
    rows) and not folded (a few rows: on CPU with a trimmed plan, the small-call path's per-expert
    ``addmm``; with a static plan, added to the grouped GEMM's output)."""
    monkeypatch.setattr(ExpertFFN, "fold_rows_divisor", 10**9 if request.param else 0)
    return request.param


@pytest.fixture(params=[True, False], ids=["padded", "grouped"])
def padded(request, monkeypatch):
    """Both CPU ways of computing the experts of a trimmed plan (``ExpertFFN.padded_capacity``):
    groups padded to one size and batched, whatever their sizes (``pad_slack`` huge), and the
    grouped GEMMs (the path off)."""
    monkeypatch.setattr(ExpertFFN, "pad_slack", 10.0**9 if request.param else -1)
    return request.param


def reference_moe(layer, x, decision):
    """The per-expert loop (``moe.reference.loop_moe``, also the bench's oracle): the definition
    the fast path must equal."""
    return loop_moe(x, decision, layer.experts)


def test_loop_reference_is_the_per_token_sum_over_used_slots():
    """The oracle itself, against the formula written out token by token:
    out[s] = sum over used k of weight[s, k] * FFN_{expert[s, k]}(x[s]), padding 0."""
    layer = make_layer(5, 8, 12, "adaptive", threshold=0.15)
    x = torch.randn(23, 8)
    mask = torch.ones(23, dtype=torch.bool)
    mask[[0, 7]] = False
    decision = layer.gate(x, mask)
    assert decision.experts_per_token.eq(2).any() and decision.experts_per_token.eq(1).any()
    e = layer.experts
    expected = torch.zeros_like(x)
    for s in range(x.shape[0]):
        for k in range(decision.used.shape[1]):
            if decision.used[s, k]:
                j = int(decision.expert_index[s, k])
                h = e.activation_fn(x[s] @ e.fc1_weight[j] + e.fc1_bias[j])
                expected[s] += decision.weight[s, k] * (h @ e.fc2_weight[j] + e.fc2_bias[j])
    torch.testing.assert_close(loop_moe(x, decision, e), expected, atol=1e-6, rtol=1e-5)


# ---- routing on hand-built logits -------------------------------------------------------------

PROBS = [
    [0.50, 0.45, 0.03, 0.02],  # gap 0.05: two experts at T = 0.1
    [0.70, 0.20, 0.06, 0.04],  # gap 0.50: one expert
    [0.10, 0.40, 0.35, 0.15],  # gap 0.05, best is expert 1
    [0.30, 0.30, 0.25, 0.15],  # exact tie at the top
]


def test_top1_and_top2_use_one_and_two_experts():
    logits = logits_from_probs(PROBS)
    d1 = route(logits, "top1")
    assert d1.used.tolist() == [[True]] * 4
    assert d1.expert_index[:, 0].tolist()[:3] == [0, 0, 1]
    d2 = route(logits, "top2")
    assert d2.used.all() and d2.expert_index[:3].tolist() == [[0, 1], [0, 1], [1, 2]]


def test_adaptive_threshold_decides_exactly():
    d = route(logits_from_probs(PROBS), "adaptive", threshold=0.1)
    assert d.experts_per_token.tolist() == [2, 1, 2, 2]
    assert d.expert_index[2].tolist() == [1, 2]
    # the combine weights are the softmax probabilities of the used experts (default)
    assert torch.allclose(d.weight[0], torch.tensor([0.50, 0.45]))
    assert torch.allclose(d.weight[1], torch.tensor([0.70, 0.0]))


def test_threshold_zero_is_top1_and_one_is_top2():
    logits = torch.randn(64, 8)
    top1, top2 = route(logits, "top1"), route(logits, "top2")
    t0 = route(logits, "adaptive", threshold=0.0)
    t1 = route(logits, "adaptive", threshold=1.0)
    assert t0.experts_per_token.eq(1).all()
    assert torch.equal(t0.expert_index[:, :1], top1.expert_index)
    assert torch.equal(t0.weight[:, :1], top1.weight)
    assert torch.equal(t1.used, top2.used) and torch.equal(t1.weight, top2.weight)
    assert torch.equal(t1.expert_index, top2.expert_index)


def test_adaptive_max_experts_beyond_two():
    probs = [[0.30, 0.28, 0.25, 0.17], [0.40, 0.35, 0.20, 0.05], [0.9, 0.05, 0.03, 0.02]]
    d = route(logits_from_probs(probs), "adaptive", threshold=0.1, max_experts=3)
    # rank j is used iff p1 - pj <= T
    assert d.used.tolist() == [[True, True, True], [True, True, False], [True, False, False]]


def test_renormalized_threshold_and_combine_weights():
    probs = [[0.20, 0.15, 0.35, 0.30]]  # top-2: 0.35, 0.30 -> renormalized 0.538, 0.462
    logits = logits_from_probs(probs)
    soft = route(logits, "adaptive", threshold=0.06)
    renorm = route(logits, "adaptive", threshold=0.06, threshold_probs="renormalized")
    assert soft.experts_per_token.tolist() == [2]  # 0.35 - 0.30 = 0.05 <= 0.06
    assert renorm.experts_per_token.tolist() == [1]  # 0.538 - 0.462 = 0.077 > 0.06
    w = route(logits, "top2", combine_weights="renormalized").weight
    assert torch.allclose(w, torch.tensor([[0.35 / 0.65, 0.30 / 0.65]]))
    w1 = route(logits, "top1", combine_weights="renormalized").weight
    assert torch.allclose(w1, torch.ones(1, 1))


def test_padding_takes_no_expert():
    logits = torch.randn(5, 4)
    mask = torch.tensor([True, False, True, True, False])
    d = route(logits, "top2", token_mask=mask)
    assert d.experts_per_token.tolist() == [2, 0, 2, 2, 0]
    assert d.weight[~mask].abs().sum() == 0


def test_capacity_drops_in_priority_order():
    # every token prefers expert 0; capacity 2 admits the first two first choices only
    probs = [[0.6, 0.3, 0.05, 0.05]] * 4
    d = route(logits_from_probs(probs), "top2", capacity=2)
    assert d.used[:, 0].tolist() == [True, True, False, False]
    assert d.used[:, 1].tolist() == [True, True, False, False]  # expert 1 fills up the same way


# ---- losses -----------------------------------------------------------------------------------

def test_balance_loss_is_one_when_uniform():
    logits = torch.zeros(8, 4)
    d = route(logits, "top1")
    d.expert_index[:, 0] = torch.arange(8) % 4  # uniform first choices
    assert balance_loss(d).item() == pytest.approx(1.0)


def test_balance_loss_ignores_second_choices():
    torch.manual_seed(1)
    logits = torch.randn(32, 6)
    d = route(logits, "top2")
    before = balance_loss(d, tokens="first")
    d.expert_index[:, 1] = (d.expert_index[:, 1] + 1) % 6
    assert balance_loss(d, tokens="first").item() == before.item()
    a = route(logits, "adaptive", threshold=0.2)
    before = balance_loss(a)
    a.expert_index[:, 1] = (a.expert_index[:, 1] + 3) % 6
    assert balance_loss(a).item() == before.item()


def test_balance_loss_counts_only_single_expert_tokens():
    probs = [[0.50, 0.45, 0.03, 0.02], [0.70, 0.20, 0.06, 0.04], [0.1, 0.8, 0.05, 0.05]]
    d = route(logits_from_probs(probs), "adaptive", threshold=0.1)
    p_mean = torch.tensor(probs).mean(0)
    f1 = torch.tensor([0.5, 0.5, 0.0, 0.0])  # tokens 1 and 2 are single-expert, on experts 0, 1
    assert balance_loss(d, "single").item() == pytest.approx((4 * f1 * p_mean).sum().item(), rel=1e-6)
    f1_first = torch.tensor([2 / 3, 1 / 3, 0.0, 0.0])
    assert balance_loss(d, "first").item() == pytest.approx((4 * f1_first * p_mean).sum().item(), rel=1e-6)


def test_z_loss_matches_formula_and_skips_padding():
    logits = torch.randn(6, 4)
    mask = torch.tensor([True, True, False, True, True, False])
    d = route(logits, "top1", token_mask=mask)
    expected = torch.logsumexp(logits[mask], -1).square().mean()
    assert z_loss(d).item() == pytest.approx(expected.item(), rel=1e-6)


# ---- the layer --------------------------------------------------------------------------------

def test_bias_is_folded_for_many_rows_only():
    experts = ExpertFFN(8, 256, 1024)
    assert not experts.folds_bias(5)  # one decoding step of one sentence, beam 5
    assert not experts.folds_bias(511)
    assert experts.folds_bias(512) and experts.folds_bias(4096)  # training batches


def test_one_expert_equals_dense_ffn():
    torch.manual_seed(0)
    dim, ffn = 8, 16
    fc1, fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
    layer = MoELayer(TopKGate(dim, 1, policy="top1", max_experts=1), ExpertFFN(1, dim, ffn))
    layer.experts.load_dense(fc1, fc2)
    x = torch.randn(3, 5, dim)
    y, stats = layer(x)
    assert torch.allclose(y, fc2(F.relu(fc1(x))), atol=1e-6)
    assert stats.num_multi.item() == 0 and stats.expert_load.tolist() == [15]


def test_identical_experts_reproduce_dense_output_under_renormalized_weights():
    torch.manual_seed(0)
    dim, ffn = 8, 16
    fc1, fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
    layer = make_layer(6, dim, ffn, "adaptive", threshold=0.3, combine_weights="renormalized")
    layer.experts.load_dense(fc1, fc2)
    x = torch.randn(40, dim)
    y, stats = layer(x)
    assert stats.num_multi.item() > 0  # some tokens really took two experts
    assert torch.allclose(y, fc2(F.relu(fc1(x))), atol=1e-5)


def test_identity_experts_round_trip():
    dim = 8
    layer = make_layer(4, dim, dim, "top2", combine_weights="renormalized")
    layer.experts.activation_fn = lambda h: h
    with torch.no_grad():
        layer.experts.fc1_weight.copy_(torch.eye(dim).expand(4, dim, dim))
        layer.experts.fc2_weight.copy_(torch.eye(dim).expand(4, dim, dim))
        layer.experts.fc1_bias.zero_()
        layer.experts.fc2_bias.zero_()
    x = torch.randn(2, 7, dim)
    y, _ = layer(x)
    assert torch.allclose(y, x, atol=1e-6)


@pytest.mark.parametrize("trim", [True, False], ids=["trimmed", "static"])
@pytest.mark.parametrize("policy,threshold", [("top1", 0.1), ("top2", 0.1), ("adaptive", 0.15)])
def test_fast_path_equals_loop_reference_forward_and_backward(policy, threshold, trim, fold, padded):
    layer = make_layer(5, 8, 12, policy, threshold=threshold)
    assert layer.experts.folds_bias(37) == fold
    x = torch.randn(37, 8, requires_grad=True)
    mask = torch.ones(37, dtype=torch.bool)
    mask[[3, 20]] = False
    decision = layer.gate(x, mask)
    y, plan, _ = layer.apply_experts(x, decision, trim=trim)
    assert plan.trimmed == trim
    assert (layer.experts.padded_capacity(x, plan) is not None) == (trim and padded)
    ref = reference_moe(layer, x, decision)
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + list(layer.parameters()), g, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, [x] + list(layer.parameters()), g, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("trim", [True, False], ids=["trimmed", "static"])
def test_empty_uneven_and_single_row_groups(trim, fold, padded):
    """Output and every gradient against the loop, with groups of 1, 0, 8, 0, 1 and 8 rows."""
    layer = make_layer(6, 8, 12, "top2")
    x = torch.randn(9, 8, requires_grad=True)
    logits = torch.full((9, 6), -10.0)
    logits[:8, 2] = 10.0  # 8 tokens: expert 2 first ...
    logits[:8, 5] = 9.0  # ... expert 5 second
    logits[8, 4] = 10.0  # one token: expert 4, then expert 0
    logits[8, 0] = 5.0
    params = [x] + list(layer.experts.parameters())
    for mask, rows in ((None, 18), (torch.arange(9) < 5, 10)):  # then 4 tokens use no expert
        decision = route(logits, "top2", token_mask=mask)
        out, p, _ = layer.apply_experts(x, decision, trim=trim)
        assert p.num_rows == (rows if trim else 18)
        assert (layer.experts.padded_capacity(x, p) is not None) == (trim and padded)
        if mask is None:
            assert p.counts.tolist() == [1, 0, 8, 0, 1, 8]
        else:
            assert out[5:].abs().sum() == 0
        ref = reference_moe(layer, x, decision)
        assert torch.allclose(out, ref, atol=1e-5)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
            assert torch.allclose(a, b, atol=1e-5)


def test_small_call_computes_only_the_experts_with_rows(monkeypatch):
    """A decoding step's few rows on CPU: one addmm pair per expert that has rows (none for the
    empty ones, no grouped GEMM), equal to the loop, under no_grad and with gradients."""
    layer = make_layer(8, 16, 32, "top1")
    x = torch.randn(5, 16, requires_grad=True)
    logits = torch.full((5, 8), -10.0)
    logits[:3, 6] = 10.0
    logits[3:, 1] = 10.0  # two experts with rows, six without
    decision = route(logits, "top1")
    calls = []
    addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: calls.append(a[1].shape[0]) or addmm(*a, **k))
    monkeypatch.setattr(F, "grouped_mm", None)  # would fail if called
    with torch.no_grad():
        out, plan, _ = layer.apply_experts(x, decision)
    assert not layer.experts.folds_bias(plan.num_rows) and sorted(calls) == [2, 2, 3, 3]
    ref = reference_moe(layer, x, decision)
    assert torch.allclose(out, ref, atol=1e-6)
    out, _, _ = layer.apply_experts(x, decision)
    g = torch.randn_like(out)
    params = [x] + list(layer.experts.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        assert torch.allclose(a, b, atol=1e-5)
    # off: the grouped GEMMs (bias added), the same output
    monkeypatch.undo()
    layer.experts.loops_small_calls = False
    grouped = []
    real = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: grouped.append(1) or real(*a, **k))
    with torch.no_grad():
        out, _, _ = layer.apply_experts(x, decision)
    assert grouped and torch.allclose(out, ref, atol=1e-6)


def test_padded_path_is_taken_for_near_even_groups_only():
    """The default slack: 8 groups of 64 rows are padded and batched; one group of 80 and one
    of 48 (max 1.25x the mean) keep the grouped GEMMs, and so do a decoding step's 5 rows."""
    experts = ExpertFFN(8, 16, 32)

    def plan_of(counts):
        expert = torch.repeat_interleave(torch.arange(8), torch.tensor(counts))
        decision = route(torch.nn.functional.one_hot(expert, 8).float() * 10, "top1")
        return dispatch.plan(decision, trim=True)

    even = plan_of([64] * 8)
    assert experts.padded_capacity(torch.zeros(512, 16), even) == 64
    assert experts.padded_capacity(torch.zeros(512, 16, dtype=torch.bfloat16), even) is None
    assert experts.padded_capacity(torch.zeros(512, 16), plan_of([80, 48] + [64] * 6)) is None
    assert experts.padded_capacity(torch.zeros(5, 16), plan_of([1, 1, 1, 1, 1, 0, 0, 0])) is None


@pytest.mark.parametrize("block", [1, 3, 7, 18])
def test_cpu_row_blocks_equal_the_reference(block, monkeypatch):
    """Blocks of 1, 3 and 7 rows cut groups in their middle and leave groups out of whole blocks;
    18 rows is all of them in one block (the grouped path for many rows: uneven groups, bias
    folded)."""
    monkeypatch.setattr(ExpertFFN, "pad_slack", -1)
    monkeypatch.setattr(ExpertFFN, "fold_rows_divisor", 10**9)
    layer = make_layer(6, 8, 12, "top2")
    layer.experts.cpu_block_bytes = block * 12 * 4  # (block, F) fp32 activations
    x = torch.randn(9, 8, requires_grad=True)
    logits = torch.full((9, 6), -10.0)
    logits[:8, 2], logits[:8, 5] = 10.0, 9.0  # groups of 1, 0, 8, 0, 1, 8 rows
    logits[8, 4], logits[8, 0] = 10.0, 5.0
    decision = route(logits, "top2")
    cut = []
    row_block = dispatch.DispatchPlan.row_block
    monkeypatch.setattr(dispatch.DispatchPlan, "row_block",
                        lambda self, a, b: cut.append((a, b)) or row_block(self, a, b))
    y, p, _ = layer.apply_experts(x, decision, trim=True)
    assert layer.experts.block_rows(x, p) == block
    assert cut == ([] if block >= 18 else [(a, min(a + block, 18)) for a in range(0, 18, block)])
    ref = reference_moe(layer, x, decision)
    assert torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    params = [x] + list(layer.experts.parameters())
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="needs torch.nn.functional.grouped_mm")
def test_static_plan_never_reads_rows_grouped_mm_leaves_uninitialised(monkeypatch):
    """grouped_mm leaves the rows past the last group end uninitialised (garbage on CUDA). Here
    they are NaN, in the forward outputs and in the backward's input gradients: the layer's
    output and every gradient must still equal the reference."""
    real = F.grouped_mm

    class Poisoned(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, offs):
            ctx.save_for_backward(a, b, offs)
            out = real(a, b, offs=offs)
            out[int(offs[-1]):] = float("nan")
            return out

        @staticmethod
        def backward(ctx, grad):
            a, b, offs = ctx.saved_tensors
            grad_a = real(grad.contiguous(), b.transpose(-2, -1).contiguous(), offs=offs)
            grad_a[int(offs[-1]):] = float("nan")
            return grad_a, real(a.t(), grad.contiguous(), offs=offs), None

    monkeypatch.setattr(F, "grouped_mm", lambda a, b, offs=None: Poisoned.apply(a, b, offs))
    layer = make_layer(5, 8, 12, "adaptive", threshold=0.15)
    x = torch.randn(37, 8, requires_grad=True)
    mask = torch.ones(37, dtype=torch.bool)
    mask[[3, 20]] = False
    decision = layer.gate(x, mask)
    y, plan, _ = layer.apply_experts(x, decision, trim=False)
    assert int(plan.offsets[-1]) < plan.num_rows  # there are rows past the end
    ref = reference_moe(layer, x, decision)
    assert torch.isfinite(y).all() and torch.allclose(y, ref, atol=1e-5)
    g = torch.randn_like(y)
    params = [x] + list(layer.parameters())
    for a, b in zip(torch.autograd.grad(y, params, g, retain_graph=True),
                    torch.autograd.grad(ref, params, g, allow_unused=True)):
        b = torch.zeros_like(a) if b is None else b
        assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("policy", ["top1", "top2", "adaptive"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_accelerator_path_has_static_shapes(policy, dtype):
    """The GPU path (static plan) must not read device values on the host: no ``.item()``,
    ``.tolist()`` or data-dependent output shape (CUDA ``bincount``, ``nonzero``, boolean
    indexing). Those raise on the meta device, which carries shapes only, so a whole
    forward + backward there proves the path is free of host syncs and CUDA-graph capturable."""
    layer = make_layer(4, 16, 32, policy).to("meta", dtype)
    x = torch.empty(3, 5, 16, device="meta", dtype=dtype, requires_grad=True)
    pad = torch.empty(3, 5, dtype=torch.bool, device="meta")
    y, stats = layer(x, pad)
    assert y.shape == x.shape and y.dtype == dtype
    assert not layer.apply_experts(x.view(15, 16), stats.routing)[1].trimmed
    (y.float().sum() + stats.balance_loss + stats.z_loss).backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None for p in layer.parameters())


def test_autocast_leaves_gate_and_experts_in_their_own_precision():
    """fairseq --amp wraps the model in autocast; the gate must stay fp32 (a bf16 gate linear
    moves logits by ~6e-3, enough to flip threshold decisions) and the CPU experts exact."""
    layer = make_layer(4, 16, 32, "adaptive")
    x = torch.randn(20, 16)
    y, stats = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp, stats_amp = layer(x)
    assert y_amp.dtype == torch.float32
    assert torch.equal(stats_amp.routing.logits, stats.routing.logits)
    assert torch.equal(y_amp, y)


def test_gpu_amp_runs_experts_in_bf16_on_the_static_path(monkeypatch):
    """Under CUDA fp16 autocast (--amp) fp32 activations take bf16 grouped_mm, not the
    per-expert fallback with its host reads. Checked on meta (mirrors CUDA) with autocast
    reported on, since this machine may have no CUDA."""
    real_enabled, real_dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda *a: True if a == ("cuda",) else real_enabled(*a))
    monkeypatch.setattr(torch, "get_autocast_dtype",
                        lambda d: torch.float16 if d == "cuda" else real_dtype(d))
    layer = make_layer(4, 16, 32, "adaptive").to("meta")
    x = torch.empty(15, 16, device="meta", requires_grad=True)
    assert layer.experts.compute_dtype(x) == torch.bfloat16
    y, stats = layer(x)
    assert y.dtype == torch.float32
    (y.sum() + stats.balance_loss).backward()
    assert layer.experts.fc1_weight.grad.shape == layer.experts.fc1_weight.shape


def test_single_token_and_all_on_one_expert():
    layer = make_layer(4, 8, 12, "adaptive")
    y, stats = layer(torch.randn(1, 8))
    assert y.shape == (1, 8) and stats.num_tokens.item() == 1
    with torch.no_grad():
        layer.gate.wg.weight.zero_()
        layer.gate.wg.weight[1] = 5.0
    x = torch.rand(16, 8) + 1.0  # positive inputs: expert 1 wins for every token by far
    y, stats = layer(x)
    assert stats.expert_load[1].item() == 16 and stats.load_imbalance.item() == pytest.approx(4.0)


def test_padding_gets_zero_output_and_no_statistics():
    layer = make_layer(4, 8, 12, "top2")
    x = torch.randn(6, 2, 8)
    pad = torch.zeros(6, 2, dtype=torch.bool)
    pad[4:, 1] = True
    y, stats = layer(x, pad)
    assert y[4:, 1].abs().sum() == 0
    assert stats.num_tokens.item() == 10 and stats.expert_load.sum().item() == 20
    assert stats.experts_per_token[4:, 1].tolist() == [0, 0]


def test_gradients_reach_gate_and_experts():
    layer = make_layer(4, 8, 12, "adaptive", threshold=0.2)
    y, stats = layer(torch.randn(30, 8))
    (y.square().sum() + stats.balance_loss).backward()
    assert layer.gate.wg.weight.grad.abs().sum() > 0
    for p in layer.experts.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_capacity_factor_counts_dropped_slots():
    layer = make_layer(4, 8, 12, "top2", capacity_factor=0.5)
    y, stats = layer(torch.randn(32, 8))
    assert (stats.expert_load <= math.ceil(0.5 * 32 / 4)).all()
    assert stats.dropped_slots.item() == 64 - stats.expert_load.sum().item() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    layer = make_layer(4, 16, 32, "adaptive").to(dtype)
    x = torch.randn(20, 16, dtype=dtype, requires_grad=True)
    y, stats = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    ref, _ = make_layer(4, 16, 32, "adaptive")(x.float())
    assert torch.allclose(y.float(), ref, atol=0.1)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


def test_expert_init_does_not_depend_on_sharding():
    full = ExpertFFN(4, 8, 12, seed=3)
    shard = ExpertFFN(2, 8, 12, first_expert=2, seed=3)
    assert torch.equal(full.fc1_weight[2:], shard.fc1_weight)
    assert all(getattr(p, "moe_expert", False) for p in full.parameters())


@pytest.mark.parametrize("kwargs,option", [
    (dict(threshold=-0.1), "threshold"), (dict(policy="top3"), "policy"),
    (dict(max_experts=5), "max_experts"), (dict(eval_policy="x"), "eval_policy"),
    (dict(capacity_factor=-1.0), "capacity_factor"), (dict(threshold=float("nan")), "threshold"),
])
def test_bad_gate_options_name_the_option(kwargs, option):
    with pytest.raises(GateConfigError) as err:
        TopKGate(8, 4, **kwargs)
    assert err.value.option == option
