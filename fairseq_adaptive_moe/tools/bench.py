"""The layer bench: the paper's Table 1, measured for several MoE implementations at once.

Li et al. (EMNLP 2023), Table 1: the time of one MoE layer (forward+backward) when a fraction f of
the tokens takes a single expert and the rest take two, relative to top-2 (f = 0). Adaptive gating
saves time only if the implementation's cost follows the rows it computes, S * (2 - f).

The routing is set exactly, not learned: :func:`craft_decision` builds gate logits for which the
paper's adaptive rule (``p_1 - p_2 <= T``) gives exactly ``round(f * S)`` single-expert tokens,
with balanced expert loads. Every implementation times the same decision for the same tokens:

* ``ours``: gate linear + ``MoELayer.apply_experts`` (sort by expert, ``grouped_mm``, gather combine)
* ``ours_compiled``: the same with every slot kept (the accelerator plan: static shapes, no host
  read) under ``torch.compile(fullgraph=True, dynamic=False)``, ``mode="reduce-overhead"`` on CUDA
  (inductor plus CUDA graphs). For small layers, where kernel launches dominate. bf16 only: the
  compiler traces ``grouped_mm`` through its fake kernel, which takes bf16 alone.
* ``ours_graphed``: the static ``ours`` captured as CUDA graphs, forward and backward
  (``torch.cuda.make_graphed_callables``), with no compiler. CUDA and bf16 only.
* ``loop``: gate linear + a per-expert Python loop (``.tolist()`` group sizes, ``W.unbind(0)``)
* ``padded_einsum``: gate linear + GShard-style one-hot dispatch mask (S, E, C) with the capacity
  C = the decision's max expert load, einsum dispatch, batched expert matmuls, einsum combine
* ``fairscale``: ``fairscale.nn.moe.MOELayer`` + ``Top2Gate`` (capacity 2S/E). It can only route
  top-2, so it runs at f = 0 only; with a fixed capacity, adaptive gating would save nothing there.
* ``dense``: one dense FFN over the S * (2 - f) rows the MoE computes: a lower bound.

Forward is timed in training mode (autograd records the graph); fwd+bwd adds ``backward`` with a
fixed output gradient. Repeats run round-robin over the fractions, so background load hits every
fraction alike; the median is reported.

This is the library behind ``adaptive-moe-bench`` (:mod:`fairseq_adaptive_moe.cli.bench`); from
Python::

    device = torch.device("cpu")
    cfg = make_config("cpu", quick=True, implementations=["ours", "loop"])
    run = run_bench(cfg, device, describe_run(cfg, device))
    print(format_table(run.records))
"""

import contextlib
import copy
import json
import logging
import platform
import random
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..moe import ExpertFFN, MoELayer, RoutingDecision, TopKGate, route
from ..moe.reference import loop_moe
from ..moe.routing import position_in_expert

IMPLEMENTATIONS = ("ours", "ours_trimmed", "ours_compiled", "ours_graphed", "loop", "padded_einsum",
                   "fairscale", "dense")
STATIC_VARIANTS = ("ours_compiled", "ours_graphed")
DEFAULT_FRACTIONS = (0.0, 0.2, 0.5, 0.8, 1.0)
# Paper Table 1 (A100): fwd+bwd time relative to top-2 at each single-expert fraction.
PAPER_TABLE1 = {0.0: 1.0, 0.2: 0.97, 0.5: 0.92, 0.8: 0.76, 1.0: 0.67}
THRESHOLD = 0.1  # the paper's T; craft_decision's gaps are 0.04 (two experts) and >= 0.54 (one)

# Shape presets: experts, dim, ffn, tokens, dtype, warmup, repeats.
PRESETS = {
    "cpu": dict(experts=8, dim=256, ffn=1024, tokens=[4096], dtype="float32", warmup=1, repeats=5),
    "cuda": dict(experts=16, dim=1024, ffn=4096, tokens=[4096, 16384, 65536], dtype="bfloat16",
                 warmup=3, repeats=10),
    "quick": dict(experts=4, dim=32, ffn=64, tokens=[256], dtype="float32", warmup=1, repeats=1),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Peak bytes per element of the (S, E, C) einsum tensors (masks, their grads, autocast copies);
# fairscale measured ~17 on the H200 (9.2 GB at 16k tokens). Above 80% of free memory: skipped.
EINSUM_BYTES_PER_ELEMENT = 20


# ---- crafted routing ---------------------------------------------------------------------------

def single_expert_count(num_tokens: int, fraction: float) -> int:
    """How many of S tokens take one expert at fraction f: ``round(f * S)``."""
    return int(round(fraction * num_tokens))


def _assign_experts(num_tokens: int, num_experts: int, single: List[bool], rng: random.Random):
    """First and second experts per token: loads balanced over all used slots (within one row),
    pairs random, the two experts of a token distinct."""
    two = [t for t in range(num_tokens) if not single[t]]
    labels = [j % num_experts for j in range(num_tokens + len(two))]
    rng.shuffle(labels)
    first, second = labels[:num_tokens], labels[num_tokens:]
    # Swapping second choices between tokens keeps the multiset, hence the loads.
    for i, t in enumerate(two):
        if second[i] != first[t]:
            continue
        for _ in range(100):
            j = rng.randrange(len(two))
            if second[j] != first[t] and first[two[j]] != second[i]:
                second[i], second[j] = second[j], second[i]
                break
        else:  # e.g. E = 2 with no valid partner left: a random other expert
            second[i] = (first[t] + rng.randrange(1, num_experts)) % num_experts
    full_second = [(f + 1 + rng.randrange(num_experts - 1)) % num_experts for f in first]
    for i, t in enumerate(two):
        full_second[t] = second[i]
    return first, full_second


def craft_logits(num_tokens: int, num_experts: int, fraction: float, seed: int = 0) -> Tensor:
    """(S, E) gate logits for which adaptive gating (T = 0.1) sends exactly ``round(f * S)``
    random tokens to one expert and the others to two, with balanced expert loads.

    Probabilities: the rest of the experts share 0.1; a two-expert token has ``p_1 - p_2 = 0.04``,
    a single-expert token ``p_1 = 0.72, p_2 = 0.18`` (gap 0.54), both clear of T.
    """
    if num_experts < 2:
        raise ValueError("crafting top-2 decisions needs at least 2 experts")
    rng = random.Random(seed)
    n_single = single_expert_count(num_tokens, fraction)
    single = [False] * num_tokens
    for t in rng.sample(range(num_tokens), n_single):
        single[t] = True
    first, second = _assign_experts(num_tokens, num_experts, single, rng)

    rest = 0.1 if num_experts > 2 else 0.0
    mass = 1.0 - rest
    probs = torch.full((num_tokens, num_experts), rest / max(num_experts - 2, 1), dtype=torch.float64)
    rows = torch.arange(num_tokens)
    is_single = torch.tensor(single)
    p1 = torch.where(is_single, torch.tensor(0.8 * mass), torch.tensor(mass / 2 + 0.02))
    p2 = torch.where(is_single, torch.tensor(0.2 * mass), torch.tensor(mass / 2 - 0.02))
    probs[rows, torch.tensor(first)] = p1.double()
    probs[rows, torch.tensor(second)] = p2.double()
    return probs.log().float()


def craft_decision(num_tokens: int, num_experts: int, fraction: float, seed: int = 0,
                   device="cpu") -> RoutingDecision:
    """The adaptive-gating decision of :func:`craft_logits`, checked to have exactly
    ``round(f * S)`` single-expert tokens and all others on two experts."""
    logits = craft_logits(num_tokens, num_experts, fraction, seed).to(device)
    decision = route(logits, "adaptive", threshold=THRESHOLD, max_experts=2)
    per_token = decision.experts_per_token
    n_single = int((per_token == 1).sum())
    if n_single != single_expert_count(num_tokens, fraction) or int((per_token == 2).sum()) != num_tokens - n_single:
        raise AssertionError(f"crafted decision has {n_single} single-expert tokens, "
                             f"wanted {single_expert_count(num_tokens, fraction)}")
    return decision


def expert_loads(decision: RoutingDecision) -> Tensor:
    """(E,) used slots per expert."""
    idx = decision.expert_index[decision.used]
    return torch.bincount(idx, minlength=decision.num_experts)


# ---- the implementations -----------------------------------------------------------------------

def live_gate(x: Tensor, gate_weight: Tensor, decision: RoutingDecision) -> RoutingDecision:
    """The gate's cost on the crafted routes: fp32 linear + softmax, combine weights = the live
    probabilities of the crafted experts (so backward reaches the gate, as in training)."""
    logits = F.linear(x.float(), gate_weight.float())  # (S, E)
    probs = logits.softmax(dim=-1)
    picked = probs.gather(1, decision.expert_index)
    weight = torch.where(decision.used, picked, picked.new_zeros(()))
    return replace(decision, weight=weight, probs=probs, logits=logits)


def padded_einsum_moe(x: Tensor, decision: RoutingDecision, experts: ExpertFFN) -> Tensor:
    """GShard-style dispatch with capacity C = max expert load (no token dropped).

    Legend: (s)equence tokens, (e)xpert, (c)apacity slot, (m)odel dim, (f)fn dim, (k) rank.
    """
    num_tokens = decision.used.shape[0]
    num_experts = experts.num_experts
    used, index = decision.used, decision.expert_index
    # Each slot's column in its expert's buffer: its arrival position, first choices first.
    position = position_in_expert(index, used, num_experts)  # (s, k)
    capacity = max(int(expert_loads(decision).max()), 1)  # host sync, as any padded implementation
    column = index * capacity + position.clamp_min(0)  # (s, k) flat (e, c)
    dtype = x.dtype
    dispatch = x.new_zeros(num_tokens, num_experts * capacity).scatter_add_(
        1, column, used.to(dtype)).view(num_tokens, num_experts, capacity)
    combine = x.new_zeros(num_tokens, num_experts * capacity).scatter_add(
        1, column, decision.weight.to(dtype)).view(num_tokens, num_experts, capacity)
    rows = torch.einsum("sec,sm->ecm", dispatch, x)
    h = experts.activation_fn(torch.baddbmm(experts.fc1_bias.unsqueeze(1), rows, experts.fc1_weight))
    y = torch.baddbmm(experts.fc2_bias.unsqueeze(1), h, experts.fc2_weight)  # (e, c, m)
    return torch.einsum("sec,ecm->sm", combine, y)


class _StaticOurs(nn.Module):
    """``ours`` on the static plan, with the decision's experts as inputs, so that one compiled or
    captured graph per token count serves every fraction (same shapes, other values)."""

    def __init__(self, layer: MoELayer, template: RoutingDecision):
        super().__init__()
        self.layer = layer
        self.template = template

    def forward(self, x: Tensor, expert_index: Tensor, used: Tensor) -> Tensor:
        d = replace(self.template, expert_index=expert_index, used=used)
        return self.layer.apply_experts(x, live_gate(x, self.layer.gate.wg.weight, d), trim=False)[0]


def static_variant_unsupported(impl: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why ``impl`` cannot run here, or None."""
    if impl == "ours_graphed" and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if dtype != torch.bfloat16 or not hasattr(F, "grouped_mm"):
        return (f"needs bf16 and grouped_mm (torch {torch.__version__}, {str(dtype)[6:]}): "
                "other dtypes take the per-expert fallback, which reads group sizes on the host")
    return None


def build_static_variant(impl: str, static: _StaticOurs, sample) -> Callable[..., Tensor]:
    """``fn(x, expert_index, used)`` for ``ours_compiled`` or ``ours_graphed``."""
    if impl == "ours_graphed":
        sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in sample)
        return torch.cuda.make_graphed_callables(static, sample)
    cuda = sample[0].device.type == "cuda"
    compiled = torch.compile(static, fullgraph=True, dynamic=False,
                             mode="reduce-overhead" if cuda else None)

    def fn(x, expert_index, used):
        if cuda:  # a new training step: earlier graph outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, expert_index, used)

    return fn


@dataclass
class Case:
    """One timed configuration: ``fn(x)`` is the layer, ``rows`` the useful expert rows."""

    fn: Callable[[Tensor], Tensor]
    x: Tensor
    grad: Tensor
    params: List[Tensor]
    rows: int
    capacity: Optional[int] = None


# ---- timing ------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(case: Case, backward: bool) -> float:
    """Milliseconds for one forward (and backward)."""
    for p in case.params:
        p.grad = None
    case.x.grad = None
    device = case.x.device
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        y = case.fn(case.x)
        if backward:
            y.backward(case.grad)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    y = case.fn(case.x)
    if backward:
        y.backward(case.grad)
    return (time.perf_counter() - t0) * 1e3


def time_cases(cases: Dict[float, Case], warmup: int, repeats: int) -> Dict[float, Dict[str, List[float]]]:
    """Round-robin over the fractions: warm-up, then ``repeats`` rounds of fwd and fwd+bwd."""
    for case in cases.values():
        for _ in range(warmup):
            time_once(case, False)
            time_once(case, True)
    samples = {f: {"fwd": [], "fwdbwd": []} for f in cases}
    for _ in range(repeats):
        for f, case in cases.items():
            samples[f]["fwd"].append(time_once(case, False))
            samples[f]["fwdbwd"].append(time_once(case, True))
    return samples


# ---- the run -----------------------------------------------------------------------------------

class BadFlag(ValueError):
    """A bad bench option; the message names the command-line flag."""


def make_config(device: str = "cpu", quick: bool = False, *,
                fractions: Optional[Sequence[float]] = None, tokens: Optional[Sequence[int]] = None,
                experts: Optional[int] = None, dim: Optional[int] = None, ffn: Optional[int] = None,
                dtype: Optional[str] = None, warmup: Optional[int] = None,
                repeats: Optional[int] = None, implementations=None,
                cpu_block_mib: int = ExpertFFN.cpu_block_bytes >> 20,
                cpu_pad_slack: float = ExpertFFN.pad_slack, seed: int = 0) -> dict:
    """The checked run configuration (the flags of ``adaptive-moe-bench``, by the same names).

    The ``device`` preset (``quick``: a tiny one) in :data:`PRESETS`, overridden by every option
    that is not None. ``implementations``: names, or one string of comma-separated names (default:
    all, but ``ours_trimmed`` only on cuda). Fraction 0 (top-2) is always added. Raises
    :class:`BadFlag` naming the flag.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise BadFlag("--device cuda: no CUDA device is available")
    preset = dict(PRESETS["quick" if quick else device])
    if device == "cuda" and quick:
        preset["dtype"] = "bfloat16"
    given = dict(experts=experts, dim=dim, ffn=ffn, tokens=tokens, dtype=dtype, warmup=warmup,
                 repeats=repeats)
    preset.update({key: value for key, value in given.items() if value is not None})
    for key in ("experts", "dim", "ffn", "repeats"):
        if preset[key] <= 0:
            raise BadFlag(f"--{key} must be positive, got {preset[key]}")
    if preset["warmup"] < 0:
        raise BadFlag(f"--warmup must be >= 0, got {preset['warmup']}")
    if preset["experts"] < 2:
        raise BadFlag(f"--experts must be >= 2 (top-2 routing), got {preset['experts']}")
    if not preset["tokens"] or any(s <= 0 for s in preset["tokens"]):
        raise BadFlag(f"--tokens must be positive, got {preset['tokens']}")
    fractions = list(DEFAULT_FRACTIONS if fractions is None else fractions)
    bad = [f for f in fractions if not 0.0 <= f <= 1.0]  # also NaN
    if bad or not fractions:
        raise BadFlag(f"--fractions must lie in [0, 1], got {bad or fractions}")
    preset["fractions"] = sorted(set(fractions) | {0.0})
    if cpu_block_mib < 0:
        raise BadFlag(f"--cpu-block-mib must be >= 0, got {cpu_block_mib}")
    preset["cpu_block_bytes"] = cpu_block_mib << 20
    if not (cpu_pad_slack >= 0 or cpu_pad_slack == -1):  # also NaN
        raise BadFlag(f"--cpu-pad-slack must be >= 0, or -1 (never), got {cpu_pad_slack}")
    preset["cpu_pad_slack"] = cpu_pad_slack
    if implementations is None:
        impls = [v for v in IMPLEMENTATIONS if not (v == "ours_trimmed" and device == "cpu")]
    elif isinstance(implementations, str):
        impls = implementations.replace(",", " ").split()
    else:
        impls = list(implementations)
    unknown = [v for v in impls if v not in IMPLEMENTATIONS]
    if unknown or not impls:
        raise BadFlag(f"--implementations: unknown {unknown or impls}; expected {IMPLEMENTATIONS}")
    preset["implementations"] = [v for v in IMPLEMENTATIONS if v in impls]
    preset["notes"] = (["ours_trimmed not timed: on CPU, ours already cuts its rows to the used slots"]
                       if implementations is None and device == "cpu" else [])
    preset["device"] = device
    preset["seed"] = seed
    return preset


def machine_name(device: torch.device) -> str:
    """The GPU's name, else the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh
                         if line.startswith("model name")), "")
    except OSError:
        pass
    return name or platform.processor() or platform.machine()


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of the GPU, else the host's available memory (a huge number if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


@contextlib.contextmanager
def world_of_one(device: torch.device):
    """fairscale's MOELayer all-to-alls over a process group; a world of one is a local layer."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def build_fairscale(dim, ffn, num_experts, dtype, device):
    """``(fn, params)`` for fairscale's ``MOELayer`` + ``Top2Gate`` with as many experts, run
    under autocast for half dtypes; call it inside :func:`world_of_one`."""
    from fairscale.nn.moe import MOELayer, Top2Gate

    experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
                            for _ in range(num_experts))
    layer = MOELayer(Top2Gate(dim, num_experts), experts).to(device=device, dtype=dtype)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def fn(x: Tensor) -> Tensor:
        with autocast:
            return layer(x.unsqueeze(1)).squeeze(1)  # (S, 1, d): fairscale wants 3-D input

    return fn, list(layer.parameters())


def differences(a: Tensor, b: Tensor) -> Tuple[float, float]:
    """(max abs difference, relative Frobenius error ``|a - b| / |b|``) of a against b."""
    delta = a.float() - b.float()
    return float(delta.abs().max()), float(delta.norm()) / (float(b.float().norm()) or 1.0)


def close_enough(a: Tensor, b: Tensor, dtype: torch.dtype) -> bool:
    """``a`` (computed in ``dtype``) against the fp32 reference ``b``.

    fp32: elementwise, within 1e-4 of b's scale. bf16/fp16: the relative Frobenius error
    ``|a - b| / |b|`` within 2e-2; ours lands at ~0.4% at the bench shapes. A bf16 per-expert
    loop does not (its bf16 ``index_add_`` and bias-gradient sums drift by up to 20%), which is
    why the reference runs in fp32."""
    a, b = a.float(), b.float()
    if dtype == torch.float32:
        scale = float(b.abs().max()) or 1.0
        return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale))
    return differences(a, b)[1] <= 2e-2


def run_tokens(cfg: dict, num_tokens: int, device: torch.device, notes: List[str],
               checks: List[dict]) -> List[dict]:
    """All implementations and fractions at one token count; returns the records."""
    num_experts, dim, ffn = cfg["experts"], cfg["dim"], cfg["ffn"]
    dtype = DTYPES[cfg["dtype"]]
    fractions = cfg["fractions"]
    torch.manual_seed(cfg["seed"])
    layer = MoELayer(TopKGate(dim, num_experts, policy="adaptive", threshold=THRESHOLD),
                     ExpertFFN(num_experts, dim, ffn, seed=cfg["seed"])).to(device=device, dtype=dtype)
    layer.experts.cpu_block_bytes = cfg["cpu_block_bytes"]
    layer.experts.pad_slack = cfg["cpu_pad_slack"]
    moe_params = list(layer.parameters())
    gate_weight = layer.gate.wg.weight
    x = torch.randn(num_tokens, dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(num_tokens, dim, device=device, dtype=dtype)
    decisions = {f: craft_decision(num_tokens, num_experts, f, cfg["seed"] + 1, device)
                 for f in fractions}

    def ours(d, trim=None):  # trim=True: rows cut to the used slots (one host read on the GPU)
        return lambda inp: layer.apply_experts(inp, live_gate(inp, gate_weight, d), trim=trim)[0]

    def trimmed(d):
        return ours(d, trim=True)

    # compiled / CUDA-graph variants: built (and run once, fwd+bwd) per token count
    static_fns: Dict[str, Callable[..., Tensor]] = {}
    first = decisions[fractions[0]]
    for impl in STATIC_VARIANTS:
        if impl not in cfg["implementations"]:
            continue
        why = static_variant_unsupported(impl, device, dtype)
        if why:
            notes.append(f"{impl} skipped: {why}")
            continue
        try:
            t0 = time.perf_counter()
            fn = build_static_variant(impl, _StaticOurs(layer, first), (x, first.expert_index, first.used))
            fn(x, first.expert_index, first.used).backward(grad)
            _sync(device)
        except Exception as err:  # a compiler or capture failure is a finding, not a crash
            msg = str(err).strip().splitlines()
            notes.append(f"{impl} failed at {num_tokens} tokens: {type(err).__name__}: "
                         f"{msg[0] if msg else ''}")
            continue
        finally:
            x.grad = None
            for p in moe_params:
                p.grad = None
        notes.append(f"{impl} built at {num_tokens} tokens in {time.perf_counter() - t0:.1f} s "
                     "(compile or capture, one fwd+bwd)")
        static_fns[impl] = fn

    def static(impl, d):
        fn = static_fns[impl]
        return lambda inp: fn(inp, d.expert_index, d.used)

    def loop(d):
        return lambda inp: loop_moe(inp, live_gate(inp, gate_weight, d), layer.experts)

    def padded(d):
        return lambda inp: padded_einsum_moe(inp, live_gate(inp, gate_weight, d), layer.experts)

    # implementations timed on every crafted decision as they are: name -> (decision -> fn)
    makers: Dict[str, Callable] = dict(ours=ours, ours_trimmed=trimmed, loop=loop)
    makers.update({impl: (lambda d, i=impl: static(i, d)) for impl in static_fns})

    einsum_budget = 0.8 * free_memory_bytes(device)

    def padded_fits(d) -> bool:
        need = num_tokens * num_experts * int(expert_loads(d).max()) * EINSUM_BYTES_PER_ELEMENT
        return need <= einsum_budget

    def output_and_grads(fn, inp=x, params=moe_params, out_grad=grad):
        """The output, then the gradients of the input and every MoE parameter."""
        inp.grad = None
        for p in params:
            p.grad = None
        out = fn(inp)
        out.backward(out_grad)
        # clones: a CUDA graph's outputs live in its static pool and are overwritten on replay
        return [out.detach().clone()] + [t.grad.clone() if t.grad is not None else torch.zeros_like(t)
                                         for t in [inp] + params]

    # Correctness guard: the fast paths must equal the loop, forward and backward, on every
    # crafted decision, before anything is timed. The loop reference runs in fp32 on upcast
    # copies of the same weights and inputs.
    ref_experts = copy.deepcopy(layer.experts).float()
    ref_gate = gate_weight.detach().float().requires_grad_()
    ref_params = [ref_gate] + list(ref_experts.parameters())
    ref_x = x.detach().float().requires_grad_()
    names = ["output", "grad x"] + [f"grad {n}" for n, _ in layer.named_parameters()]
    for f, d in decisions.items():
        ref = output_and_grads(lambda inp: loop_moe(inp, live_gate(inp, ref_gate, d), ref_experts),
                               ref_x, ref_params, grad.float())
        fast = [(i, makers[i]) for i in ("ours", "ours_trimmed", *static_fns)]
        for impl, make in fast + [("padded_einsum", padded)]:
            if impl not in cfg["implementations"] or (impl == "padded_einsum" and not padded_fits(d)):
                continue
            got = output_and_grads(make(d))
            errors = [differences(a, b) for a, b in zip(got, ref)]
            checks.append(dict(impl=impl, reference="loop (fp32)", tokens=num_tokens, fraction=f,
                               max_abs_diff=max(e[0] for e in errors),
                               max_rel_err=max(e[1] for e in errors)))
            for what, a, b, (diff, rel) in zip(names, got, ref, errors):
                if not close_enough(a, b, dtype):
                    raise AssertionError(
                        f"correctness check failed: {impl} != loop ({what}) at tokens {num_tokens}, "
                        f"f={f} (max abs diff {diff:.3g}, relative error {rel:.3g})")

    records = []
    for impl in cfg["implementations"]:
        cases: Dict[float, Case] = {}
        if impl == "fairscale":
            capacity = 2 * num_tokens // num_experts
            need = num_tokens * num_experts * capacity * EINSUM_BYTES_PER_ELEMENT
            if num_tokens % num_experts:
                notes.append(f"fairscale skipped at {num_tokens} tokens: Top2Gate needs S % E == 0")
            elif need > einsum_budget:
                notes.append(f"fairscale skipped at {num_tokens} tokens: its S x E x 2S/E masks "
                             f"need ~{need / 2**30:.0f} GiB > 80% of free memory")
            else:
                try:
                    with world_of_one(device):
                        fn, params = build_fairscale(dim, ffn, num_experts, dtype, device)
                        cases[0.0] = Case(fn, x, grad, params, 2 * num_tokens, capacity)
                        samples = time_cases(cases, cfg["warmup"], cfg["repeats"])
                except (RuntimeError, ImportError) as err:  # e.g. no NCCL, out of memory
                    notes.append(f"fairscale failed at {num_tokens} tokens: "
                                 f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")
                else:
                    records += make_records(impl, num_tokens, cases, samples, dim, ffn)
            continue
        for f, d in decisions.items():
            n_single = single_expert_count(num_tokens, f)
            rows = 2 * num_tokens - n_single
            if impl in makers:
                cases[f] = Case(makers[impl](d), x, grad, moe_params, rows)
            elif impl in STATIC_VARIANTS:  # not built (unsupported here, or failed: see notes)
                break
            elif impl == "padded_einsum":
                capacity = int(expert_loads(d).max())
                if not padded_fits(d):
                    need = num_tokens * num_experts * capacity * EINSUM_BYTES_PER_ELEMENT
                    notes.append(f"padded_einsum skipped at {num_tokens} tokens, f={f}: its "
                                 f"S x E x C masks need ~{need / 2**30:.0f} GiB > 80% of free memory")
                    continue
                cases[f] = Case(padded(d), x, grad, moe_params, rows, capacity)
            elif impl == "dense":
                torch.manual_seed(cfg["seed"] + 2)
                ffn_net = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim)).to(
                    device=device, dtype=dtype)
                xr = torch.randn(rows, dim, device=device, dtype=dtype, requires_grad=True)
                gr = torch.randn(rows, dim, device=device, dtype=dtype)
                cases[f] = Case(ffn_net, xr, gr, list(ffn_net.parameters()), rows)
        if not cases:
            continue
        if 0.0 not in cases:
            notes.append(f"{impl} at {num_tokens} tokens: no f=0 (top-2) time, so no ratios")
        samples = time_cases(cases, cfg["warmup"], cfg["repeats"])
        records += make_records(impl, num_tokens, cases, samples, dim, ffn)
    return records


def make_records(impl, num_tokens, cases, samples, dim, ffn) -> List[dict]:
    """One record per fraction: median times, ratios to f = 0, TFLOP/s of the useful rows."""
    out = []
    base = samples.get(0.0)
    base_fwd = statistics.median(base["fwd"]) if base else None
    base_fb = statistics.median(base["fwdbwd"]) if base else None
    for f, case in cases.items():
        fwd = statistics.median(samples[f]["fwd"])
        fb = statistics.median(samples[f]["fwdbwd"])
        flops = 2 * 2 * case.rows * dim * ffn  # two matmuls, 2 flops per multiply-add
        out.append(dict(
            impl=impl, tokens=num_tokens, fraction=f,
            single_expert_tokens=single_expert_count(num_tokens, f), rows=case.rows,
            capacity=case.capacity,
            fwd_ms=fwd, fwdbwd_ms=fb,
            fwd_ratio=fwd / base_fwd if base_fwd else None,
            fwdbwd_ratio=fb / base_fb if base_fb else None,
            compute_ratio=(2 - f) / 2,
            paper_fwdbwd_ratio=PAPER_TABLE1.get(round(f, 6)),
            fwd_tflops=flops / (fwd * 1e-3) / 1e12,
            fwdbwd_tflops=3 * flops / (fb * 1e-3) / 1e12,
            fwd_ms_samples=samples[f]["fwd"], fwdbwd_ms_samples=samples[f]["fwdbwd"],
        ))
    return out


def _fmt(value, spec) -> str:
    return "-" if value is None else format(value, spec)


def format_table(records: List[dict]) -> str:
    """The records as the text table ``adaptive-moe-bench`` prints."""
    head = (f"{'impl':<14}{'tokens':>7}{'f':>6}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd/top2':>10}"
            f"{'f+b/top2':>10}{'compute':>9}{'paper':>7}{'fwd TF/s':>10}{'f+b TF/s':>10}")
    lines = [head, "-" * len(head)]
    last = None
    for r in records:
        if last is not None and r["impl"] != last:
            lines.append("")
        last = r["impl"]
        lines.append(
            f"{r['impl']:<14}{r['tokens']:>7}{r['fraction']:>6.2f}{r['fwd_ms']:>10.2f}"
            f"{r['fwdbwd_ms']:>12.2f}{_fmt(r['fwd_ratio'], '.3f'):>10}"
            f"{_fmt(r['fwdbwd_ratio'], '.3f'):>10}{r['compute_ratio']:>9.2f}"
            f"{_fmt(r['paper_fwdbwd_ratio'], '.2f'):>7}{r['fwd_tflops']:>10.3g}"
            f"{r['fwdbwd_tflops']:>10.3g}")
    return "\n".join(lines)


def plot(records: List[dict], meta: dict, path: Path) -> None:
    """bench.png: fwd+bwd time relative to top-2 against f (with the paper's Table 1 and the
    compute ratio), and the absolute times. Raises ImportError without matplotlib."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq sets the root to DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, ax_ms) = plt.subplots(1, 2, figsize=(12, 4.8))
    fs = sorted({r["fraction"] for r in records} | set(PAPER_TABLE1))
    ax.plot(fs, [(2 - f) / 2 for f in fs], "k--", label="compute ratio (2-f)/2")
    ax.plot(list(PAPER_TABLE1), list(PAPER_TABLE1.values()), "r*", ms=12, label="paper Table 1 (A100)")
    styles = ["-", ":", "-."]
    token_counts = sorted({r["tokens"] for r in records})
    for i, impl in enumerate(IMPLEMENTATIONS):
        for j, s in enumerate(token_counts):
            rs = sorted((r for r in records if r["impl"] == impl and r["tokens"] == s),
                        key=lambda r: r["fraction"])
            rs_ratio = [r for r in rs if r["fwdbwd_ratio"] is not None]
            if not rs:
                continue
            label = f"{impl} ({s} tok)"
            color = f"C{i}"
            ax.plot([r["fraction"] for r in rs_ratio], [r["fwdbwd_ratio"] for r in rs_ratio],
                    marker="o", ls=styles[j % 3], color=color, label=label)
            ax_ms.plot([r["fraction"] for r in rs], [r["fwdbwd_ms"] for r in rs], marker="o",
                       ls=styles[j % 3], color=color, label=label)
    ax.set_xlabel("fraction of single-expert tokens f")
    ax.set_ylabel("fwd+bwd time / own top-2 time")
    ax.set_title("relative to top-2 (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax_ms.set_yscale("log")
    ax_ms.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_ms.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax_ms.set_xlabel("fraction of single-expert tokens f")
    ax_ms.set_ylabel("fwd+bwd ms (median)")
    ax_ms.set_title("absolute time")
    ax_ms.grid(alpha=0.3, which="both")
    fig.suptitle(f"{meta['machine']}, {meta['dtype']}, E={meta['experts']} d={meta['dim']} "
                 f"ffn={meta['ffn']}, torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- a whole run -------------------------------------------------------------------------------

def describe_run(cfg: dict, device: torch.device, command: str = "") -> dict:
    """The ``meta`` block of bench.json: the command, machine, software and configuration."""
    return dict(
        command=command, machine=machine_name(device), device=cfg["device"],
        torch=torch.__version__, python=platform.python_version(),
        cpu_threads=torch.get_num_threads(), dtype=cfg["dtype"], experts=cfg["experts"],
        dim=cfg["dim"], ffn=cfg["ffn"], tokens=cfg["tokens"], fractions=cfg["fractions"],
        warmup=cfg["warmup"], repeats=cfg["repeats"], implementations=cfg["implementations"],
        cpu_block_mib=cfg["cpu_block_bytes"] >> 20, cpu_pad_slack=cfg["cpu_pad_slack"],
        seed=cfg["seed"], threshold=THRESHOLD,
        paper_table1=PAPER_TABLE1,
        timing="median; forward with autograd recording; fwd+bwd = forward + backward(grad)",
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


@dataclass
class BenchRun:
    """What a run measured: the contents of bench.json."""

    meta: dict
    records: List[dict]
    checks: List[dict]  # the correctness checks against the fp32 loop, one per impl, tokens, f
    notes: List[str]

    def write_json(self, out: Path, done: Optional[List[int]] = None) -> Path:
        """``out/bench.json`` (written to a temporary file, then renamed); ``meta["tokens_done"]``
        names the token counts it holds (default: all of the configuration's)."""
        self.meta["tokens_done"] = list(self.meta["tokens"]) if done is None else done
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "bench.json.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(dict(meta=self.meta, records=self.records, checks=self.checks,
                           notes=self.notes, vs_dense=dense_ratios(self.records)), fh, indent=1)
        tmp.replace(out / "bench.json")
        return out / "bench.json"


def run_bench(cfg: dict, device: torch.device, meta: dict, out: Optional[Path] = None) -> BenchRun:
    """Every token count of ``cfg`` (see :func:`make_config`), in order.

    With ``out``, bench.json is written after each token count but the last, so that a run
    stopped by a time limit keeps what it measured; the caller writes the final one
    (:meth:`BenchRun.write_json`). Raises AssertionError when a fast path differs from the
    loop reference (nothing of that token count is timed).
    """
    run = BenchRun(meta, [], [], list(cfg.get("notes", [])))
    t0 = time.perf_counter()
    for i, num_tokens in enumerate(cfg["tokens"]):
        run.records += run_tokens(cfg, num_tokens, device, run.notes, run.checks)
        meta["wall_s"] = time.perf_counter() - t0
        if out is not None and i + 1 < len(cfg["tokens"]):
            run.write_json(out, cfg["tokens"][:i + 1])
    if "fairscale" in cfg["implementations"]:
        run.notes.append("fairscale (Top2Gate, capacity 2S/E) routes top-2 only: timed at f=0; its "
                         "fixed capacity means adaptive gating would save nothing there")
    return run


def format_header(cfg: dict, meta: dict) -> str:
    """The lines printed before a run: command, machine, shape."""
    return "\n".join([
        f"command: {meta['command']}",
        f"machine: {meta['machine']} ({meta['device']}); torch {meta['torch']}; "
        f"CPU threads {meta['cpu_threads']}; python {meta['python']}",
        f"shape: {cfg['experts']} experts, d {cfg['dim']}, ffn {cfg['ffn']}, dtype {cfg['dtype']}, "
        f"tokens {cfg['tokens']}; warmup {cfg['warmup']}, repeats {cfg['repeats']} (median)",
    ])


def dense_ratios(records: Sequence[dict], impl: str = "ours") -> List[dict]:
    """``impl``'s fwd+bwd time over the dense FFN's over the same rows, at every token count and
    fraction where both were timed: at f = 1 (every token on one expert) the FLOPs are the same,
    so the ratio is what routing, dispatch and combine add on top of them."""
    dense = {(r["tokens"], r["fraction"]): r for r in records if r["impl"] == "dense"}
    out = []
    for r in records:
        d = dense.get((r["tokens"], r["fraction"]))
        if r["impl"] == impl and d is not None:
            out.append({"tokens": r["tokens"], "fraction": r["fraction"],
                        "fwd": r["fwd_ms"] / d["fwd_ms"], "fwdbwd": r["fwdbwd_ms"] / d["fwdbwd_ms"]})
    return out


def dense_summary(records: Sequence[dict], impl: str = "ours") -> List[str]:
    """One line per token count: ``impl`` against the dense FFN at f = 1 and f = 0.8."""
    lines = []
    ratios = dense_ratios(records, impl)
    for tokens in sorted({r["tokens"] for r in ratios}):
        cells = [f"f={r['fraction']:g} {r['fwdbwd']:.2f}x (fwd {r['fwd']:.2f}x)"
                 for r in sorted(ratios, key=lambda r: -r["fraction"])
                 if r["tokens"] == tokens and r["fraction"] in (1.0, 0.8)]
        if cells:
            lines.append(f"{impl} vs a dense FFN over the same rows, fwd+bwd, {tokens} tokens: "
                         + ", ".join(cells))
    return lines


def format_report(cfg: dict, run: BenchRun) -> str:
    """The table, how to read it, the dense-relative summary, the correctness summary and the
    notes."""
    lines = ["", format_table(run.records), ""] + dense_summary(run.records) + [
             "compute = (2-f)/2; paper = Table 1 fwd+bwd / top-2 (A100); TF/s counts useful expert "
             "FLOPs 2 * 2 * rows * d * ffn (x3 for fwd+bwd), rows = S * (2 - f)",
             f"timing: median of {cfg['repeats']} after {cfg['warmup']} warm-up, round-robin over f; "
             "fwd records the autograd graph (training mode); all but dense include the gate linear"]
    checked = sorted({c["impl"] for c in run.checks})
    if checked:
        worst = max(c["max_abs_diff"] for c in run.checks)
        worst_rel = max(c["max_rel_err"] for c in run.checks)
        lines.append(f"correctness: {' and '.join(checked)} equal the per-expert loop run in fp32 "
                     f"(output and all gradients) at every f before timing (max abs diff "
                     f"{worst:.2e}, max relative error {worst_rel:.2e})")
    lines += [f"note: {note}" for note in run.notes]
    return "\n".join(lines)
