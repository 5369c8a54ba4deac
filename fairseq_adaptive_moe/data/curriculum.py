"""Complexity-ordered batches (paper §3.2), in plain PyTorch/numpy: no fairseq import.

The complexity vector of a training sample d is ``C_d = [r_1 .. r_L]``, where ``r_i`` is the
share of d's non-padding tokens that used 2+ experts in MoE layer i. It is collected from the
training forward passes themselves (:func:`sample_complexity`, called by the criterion) and kept
per sample id in a :class:`ComplexityTracker`. Before a curriculum epoch, :func:`curriculum_order`
orders the epoch's samples:

1. **zero group**: seen samples with no two-expert token in any layer (``C_d = 0``). They have
   the fewest two-expert tokens there can be, so they lead; a zero vector has no direction, so
   they are ordered by (length, id).
2. **seen, C_d != 0**: the anchor is the sample with the fewest two-expert tokens (summed over
   layers; ties: shortest, then lowest id). It comes first, then the others by the cosine
   similarity of their C to the anchor's, most similar first. Similarities are rounded to 9
   decimals; equal ones break by (length, id), which keeps padding low.
3. **unseen** samples (never observed in training) come last, by (length, id), and are batched
   separately: they never share a batch with seen samples, so they cannot spoil a batch's
   complexity; after this epoch they are seen.

Every rule is a total order on numbers that every rank holds identically, so every rank
computes the same order. Batches are then cut from each group with fairseq's ``batch_by_size``
limits (done by the task), and optionally shuffled in place within buckets
(:func:`shuffle_in_buckets`).
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

SAMPLE_COMPLEXITY_KEY = "_moe_sample_complexity"
"""The private logging-output key the criterion fills and the task pops before fairseq's
logging all-reduce (which would sum it)."""

SHUFFLE_MODES = ("none", "buckets")


def sample_complexity(net_output, sample) -> Optional[Tensor]:
    """Per-sample two-expert counts of one training forward, packed for the tracker.

    Reads ``net_output[1]["moe_stats"]``: one ``MoEStats`` per MoE layer whose
    ``experts_per_token`` is (T, B) (0 = padding, 1 = one expert, 2+ = two or more).

    Returns a (B, 1 + 2L) int64 tensor on the model's device (no host sync):
    ``[id, multi_1 .. multi_L, tokens_1 .. tokens_L]`` where ``multi_i`` counts the sample's
    tokens that used 2+ experts in layer i and ``tokens_i`` its non-padding tokens there.
    None when the model has no MoE layer.
    """
    extra = net_output[1] if isinstance(net_output[1], dict) else {}
    stats = extra.get("moe_stats", [])
    if not stats:
        return None
    ids = sample["id"]
    multi, tokens = [], []
    for s in stats:
        per_token = s.experts_per_token  # (T, B)
        if per_token.dim() != 2 or per_token.shape[1] != ids.numel():
            raise ValueError(f"{s.name}: experts_per_token must be (T, B={ids.numel()}), "
                             f"got {tuple(per_token.shape)}")
        multi.append((per_token >= 2).sum(0))
        tokens.append((per_token > 0).sum(0))
    return torch.cat([ids.view(-1, 1).to(multi[0].device, torch.long),
                      torch.stack(multi, 1).long(), torch.stack(tokens, 1).long()], dim=1)


class ComplexityTracker:
    """Two-expert counts of every training sample, by sample id, kept across epochs.

    multi:  (N, L) int32  tokens of sample d that used 2+ experts in MoE layer i
    tokens: (N, L) int32  non-padding tokens of sample d in layer i (0 = never seen)

    ``C_d = multi_d / tokens_d``. Each observation replaces the sample's previous one: the
    vector describes the model as it was when the sample was last trained on.
    """

    def __init__(self, num_samples: int = 0):
        self.num_samples = num_samples
        self.multi: Optional[Tensor] = None
        self.tokens: Optional[Tensor] = None

    @property
    def num_layers(self) -> int:
        return 0 if self.multi is None else self.multi.shape[1]

    def resize(self, num_samples: int) -> bool:
        """Track ``num_samples`` samples; forget everything if that is a change (-> True)."""
        changed = num_samples != self.num_samples and self.multi is not None
        if num_samples != self.num_samples:
            self.num_samples, self.multi, self.tokens = num_samples, None, None
        return changed

    def seen(self) -> Tensor:
        """(N,) bool: samples observed at least once."""
        if self.tokens is None:
            return torch.zeros(self.num_samples, dtype=torch.bool)
        return self.tokens.sum(1) > 0

    def complexity(self) -> Tensor:
        """(N, L) float: ``C_d`` (zeros for unseen samples)."""
        if self.multi is None:
            return torch.zeros(self.num_samples, 0)
        return self.multi.float() / self.tokens.clamp_min(1).float()

    def update(self, packed: Optional[Tensor]) -> None:
        """Record rows from :func:`sample_complexity` (several batches or ranks concatenated:
        when an id repeats, its last row wins)."""
        if packed is None or packed.numel() == 0:
            return
        packed = packed.cpu()
        width = packed.shape[1] - 1
        if width <= 0 or width % 2:
            raise ValueError(f"packed complexity rows must have 1 + 2L columns, got {width + 1}")
        num_layers = width // 2
        if self.multi is None:
            self.multi = torch.zeros(self.num_samples, num_layers, dtype=torch.int32)
            self.tokens = torch.zeros(self.num_samples, num_layers, dtype=torch.int32)
        elif num_layers != self.num_layers:
            raise ValueError(f"complexity vectors had {self.num_layers} MoE layers, "
                             f"now {num_layers}")
        ids = packed[:, 0].numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise IndexError(f"sample id out of range [0, {self.num_samples})")
        _, last_from_end = np.unique(ids[::-1], return_index=True)
        keep = torch.from_numpy(len(ids) - 1 - last_from_end)
        rows = packed[keep]
        self.multi[rows[:, 0]] = rows[:, 1:1 + num_layers].to(torch.int32)
        self.tokens[rows[:, 0]] = rows[:, 1 + num_layers:].to(torch.int32)

    def state_dict(self) -> Dict:
        """Tensors and ints only: loads under ``torch.load(weights_only=True)``."""
        state = {"version": 1, "num_samples": self.num_samples}
        if self.multi is not None:
            state["multi"], state["tokens"] = self.multi.clone(), self.tokens.clone()
        return state

    def load_state_dict(self, state: Dict) -> None:
        self.num_samples = int(state["num_samples"])
        self.multi = state["multi"].to(torch.int32).clone() if "multi" in state else None
        self.tokens = state["tokens"].to(torch.int32).clone() if "tokens" in state else None

    def digest(self) -> str:
        """A short hash of the state (to compare ranks and runs)."""
        import hashlib

        h = hashlib.sha1(str(self.num_samples).encode())
        if self.multi is not None:
            h.update(self.multi.numpy().tobytes())
            h.update(self.tokens.numpy().tobytes())
        return h.hexdigest()[:16]


def curriculum_order(indices, multi, tokens, lengths=None) -> List[np.ndarray]:
    """Order one epoch's samples by complexity (rules in the module docstring).

    indices: (M,) sample ids of the epoch (after fairseq's size filter), any order
    multi, tokens: (N, L) per-sample per-layer counts (a :class:`ComplexityTracker`'s)
    lengths: (M,) tie-break lengths of ``indices`` (default: all equal)

    Returns ``[seen, unseen]``: two int64 arrays of sample ids, each in batch order; batches
    are cut from each separately.
    """
    indices = np.asarray(indices, dtype=np.int64)
    lengths = np.zeros(len(indices), np.int64) if lengths is None else np.asarray(lengths)
    if multi is None or len(indices) == 0 or multi.shape[1] == 0:
        order = np.lexsort((indices, lengths))
        return [indices[:0], indices[order]]
    m = _as_numpy(multi)[indices].astype(np.float64)  # (M, L)
    t = _as_numpy(tokens)[indices].astype(np.float64)
    seen = t.sum(1) > 0
    n_multi = m.sum(1)
    nonzero = seen & (n_multi > 0)
    c = m / np.maximum(t, 1.0)

    group = np.where(seen, np.where(nonzero, 1, 0), 2)
    neg_sim = np.zeros(len(indices))
    if nonzero.any():
        candidates = np.flatnonzero(nonzero)
        anchor = candidates[np.lexsort((indices[candidates], lengths[candidates],
                                        n_multi[candidates]))[0]]
        a = c[anchor]
        norms = np.linalg.norm(c, axis=1)
        # rounded, so that vectors equal up to float rounding tie (and break by length, id)
        sim = np.round((c @ a) / np.maximum(norms * np.linalg.norm(a), 1e-300), 9)
        neg_sim = np.where(nonzero, -sim, 0.0)
        neg_sim[anchor] = -np.inf  # the anchor leads its group, whatever the rounding
    order = np.lexsort((indices, lengths, neg_sim, group))
    ordered, ordered_group = indices[order], group[order]
    return [ordered[ordered_group < 2], ordered[ordered_group == 2]]


def shuffle_in_buckets(batches: Sequence, bucket_steps: int, num_shards: int, seed: int) -> list:
    """Shuffle training steps within consecutive buckets of ``bucket_steps`` steps.

    A step is ``num_shards`` consecutive batches (one per data-parallel rank, as fairseq shards
    them), kept together so that the ranks still train on batches of similar complexity at the
    same step. The batches themselves are not changed. Same seed -> same result on every rank.
    """
    steps = [list(batches[i:i + num_shards]) for i in range(0, len(batches), num_shards)]
    rng = np.random.RandomState(seed % 2**32)
    out = []
    for start in range(0, len(steps), bucket_steps):
        bucket = steps[start:start + bucket_steps]
        for j in rng.permutation(len(bucket)):
            out.extend(bucket[j])
    return out


def batch_complexity_spread(batches: Sequence, multi, tokens) -> Dict[str, float]:
    """How complex an epoch's batches are, from the tracked counts.

    A batch's share is its tracked two-expert tokens over its tracked tokens (all MoE layers,
    seen samples only). Returns the min / median / max of that share over batches with a seen
    sample, and the mean over those batches of the within-batch standard deviation of the
    samples' own shares (what the curriculum makes small). Empty dict when nothing is seen.
    """
    if multi is None or multi.shape[1] == 0:
        return {}
    m_all = _as_numpy(multi).sum(1).astype(np.float64)
    t_all = _as_numpy(tokens).sum(1).astype(np.float64)
    shares, stds = [], []
    for batch in batches:
        batch = np.asarray(batch, dtype=np.int64)
        t = t_all[batch]
        seen = t > 0
        if not seen.any():
            continue
        m, t = m_all[batch][seen], t[seen]
        shares.append(m.sum() / t.sum())
        stds.append(float(np.std(m / t)))
    if not shares:
        return {}
    return {"min": float(np.min(shares)), "median": float(np.median(shares)),
            "max": float(np.max(shares)), "within_std": float(np.mean(stds)),
            "batches": len(shares)}


def _as_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, Tensor) else np.asarray(x)
