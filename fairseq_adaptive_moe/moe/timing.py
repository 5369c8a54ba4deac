"""How much of a training step the MoE layers take, forward and backward.

``MoETimer`` hooks the MoE layers while it is active: forward pre- and post-hooks on each
:class:`MoELayer` of a given module (``MoETimer(model)``), or, without a module, torch's global
module hooks, which fire for every ``MoELayer`` the process runs (for a runner that starts timing
before the model exists, e.g. around ``fairseq-train``'s main). Nothing of ``MoELayer`` itself is
replaced, and leaving the ``with`` block removes every hook.

Forward: a clock reading before and after the call. Backward: two identity autograd nodes, one on
the layer's output and one on its input (the positional ``x``). The output's fires when the
layer's backward starts and the input's when the gradient leaves the layer, so the interval
between them is the layer's backward: gate, combine, experts and dispatch, and the balance and
z-loss gradients, which also reach the input through the gate. Ops outside the layer cannot run
inside that interval: the layers below wait for its input gradient, and the ones above have
already delivered theirs.

On CUDA the readings are CUDA events (no sync while recording); :meth:`MoETimer.collect` syncs
once and sums them, so call it after a step. On CPU they are ``time.perf_counter`` readings.

    with MoETimer(model) as timer:
        loss = model(batch).sum(); loss.backward()
        fwd_ms, bwd_ms = timer.collect()
"""

import time
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from .layer import MoELayer


class _Clock:
    """A point in time: a recorded CUDA event, or a perf_counter reading (ms)."""

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
            self.ms = None
        else:
            self.event = None
            self.ms = time.perf_counter() * 1e3

    def until(self, later: "_Clock") -> float:
        if self.event is not None:
            return self.event.elapsed_time(later.event)
        return later.ms - self.ms


class _Mark(torch.autograd.Function):
    """Identity whose backward reads the clock under ``key``."""

    @staticmethod
    def forward(ctx, x: Tensor, timer: "MoETimer", key: Tuple[int, str]) -> Tensor:
        ctx.timer, ctx.key = timer, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.timer._mark(ctx.key, grad.device)
        return grad, None, None


class MoETimer:
    """Time spent inside ``MoELayer`` forward and backward, summed over layers and calls.

    ``module``: time the MoE layers inside it (hooks on each layer); None: every ``MoELayer`` the
    process runs while the timer is active (torch's global module hooks).
    """

    def __init__(self, module: Optional[nn.Module] = None):
        self.module = module
        self._forward: List[Tuple[_Clock, _Clock]] = []
        self._backward: Dict[int, Dict[str, _Clock]] = {}
        self._calls = 0
        self._open: Dict[int, Tuple[int, _Clock, bool]] = {}  # id(layer) -> call in progress
        self._handles = None

    def __enter__(self) -> "MoETimer":
        if self._handles is not None:
            raise RuntimeError("MoETimer is already active")
        if self.module is None:
            self._handles = [register_module_forward_pre_hook(self._before),
                             register_module_forward_hook(self._after)]
        else:
            layers = [m for m in self.module.modules() if isinstance(m, MoELayer)]
            self._handles = [h for layer in layers for h in (
                layer.register_forward_pre_hook(self._before), layer.register_forward_hook(self._after))]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles or ():
            handle.remove()
        self._handles = None
        self._open.clear()

    def _before(self, layer: nn.Module, args: tuple):
        """Forward pre-hook: mark the input for the end of the backward, start the clock."""
        if not isinstance(layer, MoELayer) or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        call = self._calls
        self._calls += 1
        track_backward = torch.is_grad_enabled() and x.requires_grad
        if track_backward:
            x = _Mark.apply(x, self, (call, "end"))
        self._open[id(layer)] = (call, _Clock(x.device), track_backward)
        return (x,) + tuple(args[1:]) if track_backward else None

    def _after(self, layer: nn.Module, args: tuple, output):
        """Forward hook: stop the clock, mark the output for the start of the backward."""
        opened = self._open.pop(id(layer), None) if isinstance(layer, MoELayer) else None
        if opened is None:
            return None
        call, start, track_backward = opened
        out, stats = output
        self._forward.append((start, _Clock(out.device)))
        if track_backward and out.requires_grad:
            return _Mark.apply(out, self, (call, "begin")), stats
        return None

    def _mark(self, key: Tuple[int, str], device: torch.device) -> None:
        call, which = key
        self._backward.setdefault(call, {})[which] = _Clock(device)

    def collect(self) -> Tuple[float, float]:
        """(forward ms, backward ms) since the last collect; a layer whose backward has not
        finished yet is left for the next one."""
        if any(c.event is not None for pair in self._forward for c in pair) or any(
                c.event is not None for marks in self._backward.values() for c in marks.values()):
            torch.cuda.synchronize()
        fwd = sum(a.until(b) for a, b in self._forward)
        done = [call for call, marks in self._backward.items() if len(marks) == 2]
        bwd = sum(self._backward[c]["begin"].until(self._backward[c]["end"]) for c in done)
        for call in done:
            del self._backward[call]
        self._forward.clear()
        return fwd, bwd
