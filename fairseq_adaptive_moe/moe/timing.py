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

Dense FFN sublayers are timed the same way, separately: a module with ``fc1`` and ``fc2``
submodules (fairseq's transformer layers; in an MoE layer they are None) is an FFN sublayer from
the call of ``fc1`` to the return of ``fc2`` (activation and dropout included, the residual and
layer norm not, as for the MoE layer). A dense model's FFN time, set beside the same model's MoE
time at equal FLOPs, is the overhead routing adds (``experiments.throughput``).

On CUDA the readings are CUDA events (no sync while recording); :meth:`MoETimer.collect` syncs
once and sums them, so call it after a step. On CPU they are ``time.perf_counter`` readings.

    with MoETimer(model) as timer:
        loss = model(batch).sum(); loss.backward()
        fwd_ms, bwd_ms = timer.collect()            # the MoE layers
        # or: timer.collect_by_kind() -> {"moe": (fwd, bwd), "dense_ffn": (fwd, bwd)}
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


KINDS = ("moe", "dense_ffn")


def _dense_ffn(module: nn.Module) -> bool:
    """A dense FFN sublayer's host: ``fc1`` and ``fc2`` are modules (fairseq's transformer
    layers; an MoE layer's are None)."""
    return (not isinstance(module, MoELayer) and isinstance(getattr(module, "fc1", None), nn.Module)
            and isinstance(getattr(module, "fc2", None), nn.Module))


class MoETimer:
    """Time spent inside ``MoELayer`` forward and backward, summed over layers and calls, and,
    separately, inside dense FFN sublayers (``fc1`` ... ``fc2``).

    ``module``: time the layers inside it (hooks on each layer); None: every ``MoELayer`` and
    dense FFN sublayer the process runs while the timer is active (torch's global module hooks).
    """

    def __init__(self, module: Optional[nn.Module] = None):
        self.module = module
        self._forward: List[Tuple[str, _Clock, _Clock]] = []
        self._backward: Dict[int, Dict[str, _Clock]] = {}
        self._kind_of_call: Dict[int, str] = {}
        self._calls = 0
        self._open: Dict[int, Tuple[int, _Clock, bool]] = {}  # id(layer) -> call in progress
        self._handles = None
        self._hooked_ffns = set()

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
            for host in self.module.modules():
                if _dense_ffn(host):
                    self._hook_ffn(host)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles or ():
            handle.remove()
        self._handles = None
        self._hooked_ffns.clear()
        self._open.clear()

    def _hook_ffn(self, host: nn.Module) -> None:
        """Time ``host``'s FFN: from ``fc1``'s call to ``fc2``'s return."""
        self._hooked_ffns.add(id(host))
        key = id(host)

        def before(_fc1, args):
            return self._start(key, "dense_ffn", args)

        def after(_fc2, _args, out):
            return self._stop(key, out)

        self._handles += [host.fc1.register_forward_pre_hook(before),
                          host.fc2.register_forward_hook(after)]

    def _before(self, layer: nn.Module, args: tuple):
        """Forward pre-hook: mark the input for the end of the backward, start the clock. Under
        the global hooks, also the place where a dense FFN's host is first seen and hooked."""
        if not isinstance(layer, MoELayer):
            if self.module is None and id(layer) not in self._hooked_ffns and _dense_ffn(layer):
                self._hook_ffn(layer)
            return None
        return self._start(id(layer), "moe", args)

    def _after(self, layer: nn.Module, args: tuple, output):
        """Forward hook: stop the clock, mark the output for the start of the backward."""
        if not isinstance(layer, MoELayer):
            return None
        out, stats = output
        marked = self._stop(id(layer), out)
        return None if marked is None else (marked, stats)

    def _start(self, key: int, kind: str, args: tuple):
        if not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        call = self._calls
        self._calls += 1
        self._kind_of_call[call] = kind
        track_backward = torch.is_grad_enabled() and x.requires_grad
        if track_backward:
            x = _Mark.apply(x, self, (call, "end"))
        self._open[key] = (call, _Clock(x.device), track_backward)
        return (x,) + tuple(args[1:]) if track_backward else None

    def _stop(self, key: int, out):
        """The marked output (None: leave it as it is)."""
        opened = self._open.pop(key, None)
        if opened is None or not isinstance(out, Tensor):
            return None
        call, start, track_backward = opened
        self._forward.append((self._kind_of_call[call], start, _Clock(out.device)))
        if track_backward and out.requires_grad:
            return _Mark.apply(out, self, (call, "begin"))
        self._kind_of_call.pop(call, None)
        return None

    def _mark(self, key: Tuple[int, str], device: torch.device) -> None:
        call, which = key
        self._backward.setdefault(call, {})[which] = _Clock(device)

    def collect_by_kind(self) -> Dict[str, Tuple[float, float]]:
        """{"moe": (forward ms, backward ms), "dense_ffn": (...)} since the last collect; a
        layer whose backward has not finished yet is left for the next one."""
        if any(c.event is not None for _, *pair in self._forward for c in pair) or any(
                c.event is not None for marks in self._backward.values() for c in marks.values()):
            torch.cuda.synchronize()
        fwd = {kind: 0.0 for kind in KINDS}
        bwd = {kind: 0.0 for kind in KINDS}
        for kind, a, b in self._forward:
            fwd[kind] += a.until(b)
        done = [call for call, marks in self._backward.items() if len(marks) == 2]
        for call in done:
            marks = self._backward.pop(call)
            bwd[self._kind_of_call.pop(call)] += marks["begin"].until(marks["end"])
        self._forward.clear()
        return {kind: (fwd[kind], bwd[kind]) for kind in KINDS}

    def collect(self) -> Tuple[float, float]:
        """(forward ms, backward ms) of the MoE layers since the last collect (dense FFN time
        since then is dropped: :meth:`collect_by_kind` has both)."""
        return self.collect_by_kind()["moe"]
