"""MoETimer: MoE-layer forward and backward time inside a training step."""

import time

import pytest
import torch
import torch.nn as nn

from fairseq_adaptive_moe.moe import ExpertFFN, MoELayer, MoETimer, TopKGate


class _SlowBackward(torch.autograd.Function):
    """Identity that sleeps in backward: a known cost placed inside or outside the layer."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


class Block(nn.Module):
    """pre -> residual MoE -> post, with optional sleeps before the layer and inside its experts."""

    def __init__(self, sleep_outside=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.post = nn.Linear(16, 16), nn.Linear(16, 16)
        self.moe = MoELayer(TopKGate(16, 4, "adaptive", threshold=0.2), ExpertFFN(4, 16, 32, seed=0))
        self.sleep_outside = sleep_outside

    def forward(self, x):
        h = self.pre(x)
        if self.sleep_outside:
            h = _SlowBackward.apply(h, self.sleep_outside)
        y, stats = self.moe(h)
        return self.post(h + y).square().sum() + 0.01 * stats.balance_loss


def step(block, x):
    block.zero_grad()
    block(x).backward()
    return [p.grad.clone() for p in block.parameters()]


def test_timer_changes_no_value():
    block, x = Block(), torch.randn(40, 16)
    plain = step(block, x)
    original = MoELayer.forward
    with MoETimer() as timer:
        timed = step(block, x)
        fwd, bwd = timer.collect()
    assert fwd > 0 and bwd > 0
    for a, b in zip(plain, timed):
        assert torch.equal(a, b)
    assert MoELayer.forward is original  # restored on exit
    step(block, x)  # and still runs


def test_backward_interval_holds_the_layer_and_nothing_outside(monkeypatch):
    sleep = 0.15
    slow_experts = ExpertFFN.forward

    def experts_with_slow_backward(self, rows, plan):
        return slow_experts(self, _SlowBackward.apply(rows, sleep), plan)

    x = torch.randn(40, 16)
    with MoETimer() as timer:  # a sleep just before the layer: not counted
        step(Block(sleep_outside=sleep), x)
        fwd, bwd_outside = timer.collect()
    assert bwd_outside < sleep * 1e3 / 2
    monkeypatch.setattr(ExpertFFN, "forward", experts_with_slow_backward)
    with MoETimer() as timer:  # the same sleep inside the experts' backward: counted
        step(Block(), x)
        _, bwd_inside = timer.collect()
    assert bwd_inside >= sleep * 1e3


def test_collect_sums_layers_and_resets():
    block, x = Block(), torch.randn(40, 16)
    with MoETimer() as timer:
        step(block, x)
        step(block, x)
        fwd2, bwd2 = timer.collect()
        assert timer.collect() == (0, 0)
        with torch.no_grad():  # inference: forward time only, no pending backward
            block(x)
        fwd_eval, bwd_eval = timer.collect()
    assert fwd2 > 0 and bwd2 > 0 and fwd_eval > 0 and bwd_eval == 0


def test_timer_cannot_nest():
    with MoETimer() as timer:
        with pytest.raises(RuntimeError, match="already active"):
            timer.__enter__()


def test_timer_on_a_module_hooks_only_its_layers_and_leaves_nothing_behind():
    block, other, x = Block(), Block(), torch.randn(40, 16)
    original = MoELayer.forward
    with MoETimer(block) as timer:
        step(other, x)  # another model's layer: not timed
        assert timer.collect() == (0, 0)
        assert MoELayer.forward is original  # per-layer hooks, the class is untouched
        timed = step(block, x)
        fwd, bwd = timer.collect()
    assert fwd > 0 and bwd > 0
    assert not block.moe._forward_hooks and not block.moe._forward_pre_hooks
    assert all(torch.equal(a, b) for a, b in zip(step(block, x), timed))
    assert timer.collect() == (0, 0)  # and after exit, nothing more is recorded


def test_timer_without_a_module_removes_its_global_hooks():
    block, x = Block(), torch.randn(40, 16)
    with MoETimer() as timer:
        step(block, x)
        assert timer.collect()[0] > 0
    step(block, x)
    assert timer.collect() == (0, 0)


class DenseBlock(nn.Module):
    """A fairseq-like dense FFN sublayer (``fc1``, activation, ``fc2``) with optional sleeps:
    one in the backward between fc1 and fc2 (inside the FFN), one before fc1 (outside)."""

    def __init__(self, sleep_inside=0.0, sleep_outside=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.sleep_inside, self.sleep_outside = sleep_inside, sleep_outside

    def forward(self, x):
        h = self.pre(x)
        if self.sleep_outside:
            h = _SlowBackward.apply(h, self.sleep_outside)
        y = torch.relu(self.fc1(h))
        if self.sleep_inside:
            y = _SlowBackward.apply(y, self.sleep_inside)
        return (h + self.fc2(y)).square().sum()


@pytest.mark.parametrize("global_hooks", [True, False], ids=["global", "module"])
def test_dense_ffn_sublayers_are_timed_apart_from_moe_layers(global_hooks):
    sleep, x = 0.1, torch.randn(40, 16)
    plain = step(DenseBlock(sleep_inside=sleep), x)
    inside, outside = DenseBlock(sleep_inside=sleep), DenseBlock(sleep_outside=sleep)
    with MoETimer(None if global_hooks else inside) as timer:
        timed = step(inside, x)
        kinds = timer.collect_by_kind()
    assert all(torch.equal(a, b) for a, b in zip(plain, timed))
    assert kinds["moe"] == (0, 0)
    fwd, bwd = kinds["dense_ffn"]
    assert fwd > 0 and bwd >= sleep * 1e3
    assert not inside.fc1._forward_pre_hooks and not inside.fc2._forward_hooks  # removed
    with MoETimer(None if global_hooks else outside) as timer:
        step(outside, x)
        _, bwd_outside = timer.collect_by_kind()["dense_ffn"]
    assert 0 < bwd_outside < sleep * 1e3 / 2
    with MoETimer() as timer:  # a model with both: each in its own kind
        step(Block(), x)
        step(DenseBlock(), x)
        kinds = timer.collect_by_kind()
        assert kinds["moe"][1] > 0 and kinds["dense_ffn"][1] > 0
        assert timer.collect_by_kind() == {"moe": (0, 0), "dense_ffn": (0, 0)}
