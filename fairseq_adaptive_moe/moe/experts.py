"""Stacked expert FFNs computed as grouped GEMMs over expert-sorted rows.

Legend: (E) local experts, (N) rows sorted by expert, (C) model dim, (F) FFN dim.
"""

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "silu": F.silu,
    "swish": F.silu,
    "linear": lambda x: x,
}

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
# devices whose grouped_mm takes bf16 only; meta mirrors CUDA (shape-only runs in tests)
_BF16_ONLY = ("cuda", "meta")

# ExpertFFN's parameters, each stacked over the experts in its first dimension
EXPERT_PARAM_NAMES = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def autocast_off(device_type: str):
    """The MoE layer chooses its own precisions (fp32 gate, bf16 or input-dtype expert GEMMs);
    fairseq's ``--amp`` autocast would otherwise run the gate linear in fp16 and could recast
    the bf16 ``grouped_mm`` operands."""
    if device_type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def _autocast_half(device_type: str) -> bool:
    """Whether the caller runs under fp16/bf16 autocast on this device (``--amp``)."""
    device_type = "cuda" if device_type == "meta" else device_type  # meta mirrors CUDA (tests)
    return (device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) in (torch.float16, torch.bfloat16))


def _grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    """Whether ``F.grouped_mm`` takes these operands: CPU, or CUDA bf16, 16-byte-aligned rows."""
    if not _HAS_GROUPED_MM:
        return False
    if x.device.type in _BF16_ONLY and x.dtype != torch.bfloat16:
        return False
    if x.device.type not in ("cpu",) + _BF16_ONLY:
        return False
    item = x.element_size()
    return (x.shape[-1] * item) % 16 == 0 and (w.shape[-1] * item) % 16 == 0


def grouped_linear(rows: Tensor, weight: Tensor, plan, bias: Optional[Tensor] = None,
                   mask: bool = True) -> Tensor:
    """``rows[i] @ weight[g_i] (+ bias[g_i])`` for expert-sorted rows (N, Cin) -> (N, Cout).

    Uses ``grouped_mm`` where it applies; otherwise (torch < 2.9, unaligned shapes, CUDA
    non-bf16) a per-expert loop over ``weight.unbind(0)``, which reads the group sizes once.
    Rows of a static plan past the last group end are uninitialised by ``grouped_mm``: they are
    masked with ``where``, never multiplied by zero (that would keep a NaN). ``mask=False``
    leaves them, for an output that only another grouped GEMM over the same plan reads: it
    never reads those rows, nor do its weight gradients.
    """
    if _grouped_mm_ok(rows, weight):
        out = F.grouped_mm(rows, weight, offs=plan.offsets)
    else:
        sizes = plan.counts.tolist()
        used = sum(sizes)
        parts = [r @ w for r, w in zip(rows[:used].split(sizes), weight.unbind(0))]
        out = torch.cat(parts + [rows.new_zeros(rows.shape[0] - used, weight.shape[-1])])
    if bias is not None:
        out = _AddExpertBias.apply(out, bias, plan.expert_of_row.clamp_max(bias.shape[0] - 1))
    if plan.trimmed or not mask:
        return out
    return torch.where(plan.valid_row.unsqueeze(-1), out, out.new_zeros(()))


class _AddExpertBias(torch.autograd.Function):
    """``out + bias[expert_of_row]``, with the bias gradient summed in fp32.

    Each expert's bias gradient sums thousands of rows. Summed in bf16, as autograd's
    ``index_select`` backward would do under ``--fp16``, it keeps few of its bits."""

    @staticmethod
    def forward(ctx, out: Tensor, bias: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype
        return out + bias.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = grad.new_zeros(ctx.bias_shape, dtype=torch.float32).index_add_(
                0, index, grad.float()).to(ctx.bias_dtype)
        return grad, grad_bias, None


def _bias_columns(width: int, element_size: int) -> int:
    """Columns appended to fold a bias into a GEMM: a ones column, then zeros that keep the rows
    16-byte aligned for ``grouped_mm``."""
    align = max(1, 16 // element_size)
    return 1 + (-(width + 1)) % align


def fold_bias(weight: Tensor, bias: Tensor) -> Tensor:
    """(E, Cin, Cout) and (E, Cout) -> [W; b; 0] (E, Cin + extra, Cout), so that
    ``x @ W + b == append_ones(x) @ fold_bias(W, b)``. Saves materialising and adding an
    (N, Cout) bias tensor."""
    extra = _bias_columns(weight.shape[1], weight.element_size())
    zeros = weight.new_zeros(weight.shape[0], extra - 1, weight.shape[2])
    return torch.cat([weight, bias.unsqueeze(1), zeros], 1)


def append_ones(rows: Tensor) -> Tensor:
    """(N, Cin) -> [x, 1, 0] (N, Cin + extra), the rows that go with ``fold_bias``."""
    extra = _bias_columns(rows.shape[1], rows.element_size())
    ones = rows.new_zeros(rows.shape[0], extra)
    ones[:, 0] = 1
    return torch.cat([rows, ones], 1)


class ExpertFFN(nn.Module):
    """E feed-forward experts ``fc2(act(fc1(x)))`` with stacked weights.

    fc1_weight (E, C, F), fc1_bias (E, F), fc2_weight (E, F, C), fc2_bias (E, C). Every expert
    parameter carries ``moe_expert = True``; select expert parameters by that tag, never by name.
    Each expert is initialised like ``nn.Linear`` from its own generator seeded by ``seed`` and
    its global index (``first_expert + e``), so an expert's initial weights do not depend on how
    the experts are sharded over ranks.

    On CPU the rows are computed in blocks of at most ``cpu_block_bytes`` of activations (see
    ``block_rows``; 0 turns blocking off).
    """

    cpu_block_bytes = 16 * 2**20

    def __init__(self, num_experts: int, embed_dim: int, ffn_dim: int, activation: str = "relu",
                 activation_dropout: float = 0.0, first_expert: int = 0,
                 seed: Optional[int] = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.num_experts, self.embed_dim, self.ffn_dim = num_experts, embed_dim, ffn_dim
        self.activation = activation
        self.activation_fn = ACTIVATIONS[activation]
        self.activation_dropout = activation_dropout
        self.first_expert = first_expert
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, embed_dim, ffn_dim))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, ffn_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, ffn_dim, embed_dim))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, embed_dim))
        for p in self.parameters():
            p.moe_expert = True
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: Optional[int] = None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        for e in range(self.num_experts):
            gen = torch.Generator().manual_seed(seed + 7919 * (self.first_expert + e))
            for w, b in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
                bound = 1.0 / math.sqrt(w.shape[1])  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                w[e].copy_(torch.empty(w.shape[1:]).uniform_(-bound, bound, generator=gen))
                b[e].copy_(torch.empty(b.shape[1:]).uniform_(-bound, bound, generator=gen))

    @torch.no_grad()
    def load_dense(self, fc1: nn.Linear, fc2: nn.Linear, experts=None) -> None:
        """Copy a dense FFN (``nn.Linear`` fc1/fc2) into the given experts (default: all)."""
        for e in range(self.num_experts) if experts is None else experts:
            self.fc1_weight[e].copy_(fc1.weight.t())
            self.fc1_bias[e].copy_(fc1.bias)
            self.fc2_weight[e].copy_(fc2.weight.t())
            self.fc2_bias[e].copy_(fc2.bias)

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """grouped_mm's CUDA path wants bf16, so expert GEMMs run in bf16 under fairseq's
        ``--fp16`` (fp16 inputs) and ``--amp`` (fp16/bf16 autocast around fp32 inputs); otherwise
        in the input's dtype (exact fp32 on CPU)."""
        if x.device.type in _BF16_ONLY and _HAS_GROUPED_MM and (
                x.dtype == torch.float16 or (x.dtype == torch.float32 and _autocast_half(x.device.type))):
            return torch.bfloat16
        return x.dtype

    def block_rows(self, rows: Tensor, plan) -> int:
        """Rows per block on CPU (trimmed plans): each block's (rows, F) activations stay under
        ``cpu_block_bytes``. glibc's allocator hands blocks of 32 MiB and more back to the OS
        when freed, so every fresh activation that large page-faults again, and it does not fit
        in cache either; computing the experts in row blocks avoids both."""
        if rows.device.type != "cpu" or not plan.trimmed or not self.cpu_block_bytes:
            return rows.shape[0]
        return max(1, self.cpu_block_bytes // (self.ffn_dim * rows.element_size()))

    def folds_bias(self, num_rows: int) -> bool:
        """Whether fc1's bias is folded into its GEMM for ``num_rows`` rows. Folding copies all
        of fc1's weights (E x C x F) to save adding the bias to the (N, F) activations, so it
        pays for many rows (training batches) and costs most of the layer for a few (one
        decoding step of one sentence: a handful of rows): below ``E * C / fold_rows_divisor``
        rows the bias is added instead."""
        return num_rows * self.fold_rows_divisor >= self.num_experts * self.embed_dim

    fold_rows_divisor = 4

    # the padded path: at most this share of padding rows (E * capacity over N, less 1)
    pad_slack = 0.125

    def padded_capacity(self, rows: Tensor, plan) -> Optional[int]:
        """Rows per expert when the groups are computed padded to equal size, as one batched
        GEMM per projection (``baddbmm``), or None for the grouped GEMMs.

        On CPU, MKL runs a batch of equal GEMMs faster than the same GEMMs one group at a time:
        at d 512, FFN 2048, 8 groups of 256 rows, the grouped forward GEMMs take about 1.3x the
        batched ones, and the batched ones match one dense GEMM over all the rows
        (docs/results/speed.md). Padding costs its rows, so the path is taken only when the
        largest group is within ``pad_slack`` of the mean (near-even loads, e.g. a balanced
        top-1 layer): CPU, a trimmed plan, fp32 (the bias gradients are then summed in fp32),
        and rows enough that every expert has some on average (a decoding step's few rows keep
        the grouped path). The group sizes are read on the host, which on CPU costs nothing.
        ``pad_slack = -1`` turns the path off."""
        n = rows.shape[0]
        if (rows.device.type != "cpu" or not plan.trimmed or rows.dtype != torch.float32
                or self.fc1_weight.dtype != torch.float32 or self.pad_slack < 0
                or n < self.num_experts):
            return None
        capacity = int(plan.counts.max())
        if capacity * self.num_experts > (1 + self.pad_slack) * n:
            return None
        return capacity

    def padded_forward(self, x: Tensor, plan, capacity: int) -> Tensor:
        """The experts over (N, C) fp32 rows as two ``baddbmm`` over (E, capacity, .) groups,
        each group's rows first, zeros after. Padding rows are computed and never read back, so
        they get no gradient and give none to the weights."""
        num_experts = self.num_experts
        first_row = (plan.offsets.long() - plan.counts)[plan.expert_of_row]
        slot = plan.expert_of_row * capacity + torch.arange(x.shape[0], device=x.device) - first_row
        padded = x.new_zeros(num_experts * capacity, x.shape[1]).index_copy(0, slot, x)
        h = torch.baddbmm(self.fc1_bias.unsqueeze(1), padded.view(num_experts, capacity, -1),
                          self.fc1_weight)
        h = F.dropout(self.activation_fn(h), p=self.activation_dropout, training=self.training)
        out = torch.baddbmm(self.fc2_bias.unsqueeze(1), h, self.fc2_weight)
        return out.view(num_experts * capacity, -1).index_select(0, slot)

    # the small-call path on CPU (False: few rows take the grouped GEMMs with the bias added)
    loops_small_calls = True

    def looped_forward(self, x: Tensor, plan) -> Tensor:
        """The small-call path (CPU, trimmed plans, rows too few to fold fc1's bias: a decoding
        step): one ``addmm`` pair per expert that has rows, the experts without rows skipped.
        ``grouped_mm``'s CPU path issues a GEMM for every expert, empty or not, and reads each
        group end back; with a handful of rows those fixed costs were most of the layer. The group
        sizes are read on the host, which on CPU costs nothing."""
        dtype = x.dtype
        params = (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            # unbind: indexing W[e] would give every used expert a full-size zero gradient
            per_expert = list(zip(*(t.unbind(0) for t in params)))
        else:
            per_expert = None
        cast = self.fc1_weight.dtype != dtype
        drop = self.training and self.activation_dropout > 0
        outs = []
        start = 0
        for e, size in enumerate(plan.counts.tolist()):
            if not size:
                continue
            w1, b1, w2, b2 = per_expert[e] if per_expert else (t[e] for t in params)
            if cast:
                w1, b1, w2, b2 = w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype)
            h = self.activation_fn(torch.addmm(b1, x[start:start + size], w1))
            if drop:
                h = F.dropout(h, p=self.activation_dropout, training=True)
            outs.append(torch.addmm(b2, h, w2))
            start += size
        if not outs:
            return x.new_zeros(0, self.embed_dim)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def forward(self, rows: Tensor, plan) -> Tensor:
        """(N, C) expert-sorted rows -> (N, C); rows of unused slots (static plans) are 0."""
        dtype = self.compute_dtype(rows)
        with autocast_off(rows.device.type):
            x = rows.to(dtype)
            capacity = self.padded_capacity(x, plan)
            if capacity is not None:
                return self.padded_forward(x, plan, capacity).to(rows.dtype)
            fold = self.folds_bias(x.shape[0])
            if not fold and plan.trimmed and x.device.type == "cpu" and self.loops_small_calls:
                return self.looped_forward(x, plan).to(rows.dtype)
            w1 = self.fc1_weight.to(dtype)
            b1 = self.fc1_bias.to(dtype)
            if fold:
                w1, b1 = fold_bias(w1, b1), None
            w2, b2 = self.fc2_weight.to(dtype), self.fc2_bias.to(dtype)

            def ffn(block: Tensor, p) -> Tensor:
                # folded, unmasked: fc2 never reads rows past the end (one (N, F) pass less each
                # way); an added bias is masked, its gradient sums over every row it was added to
                h = grouped_linear(append_ones(block) if fold else block, w1, p, b1, mask=not fold)
                h = F.dropout(self.activation_fn(h), p=self.activation_dropout,
                              training=self.training)
                return grouped_linear(h, w2, p, b2)

            n, step = x.shape[0], self.block_rows(x, plan)
            if step >= n:
                out = ffn(x, plan)
            else:
                out = torch.cat([ffn(x[a:a + step], plan.row_block(a, min(a + step, n)))
                                 for a in range(0, n, step)])
        return out.to(rows.dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, embed_dim={self.embed_dim}, "
                f"ffn_dim={self.ffn_dim}, activation={self.activation}")
