"""Complexity-ordered batches (paper §3.2), in plain PyTorch/numpy: no fairseq import.

The complexity vector of a training sample d is ``C_d = [r_1 .. r_L]``, where ``r_i`` is the
share of d's non-padding tokens that used 2+ experts in MoE layer i. It is collected from the
training forward passes themselves (:func:`sample_complexity`, called by the criterion) and kept
per sample id in a :class:`ComplexityTracker`.

**The order** (:func:`sample_keys`): every sample gets a key, smallest first.

* ``mean`` (default): the mean of ``C_d`` over the layers, the sample's average two-expert
  share. Simpler samples (fewer tokens on two experts) really come first, and samples with
  similar keys have similar magnitudes, which is what a batch's cost depends on.
* ``cosine`` (the paper's §3.2, word for word): seen samples with no two-expert token lead (a
  zero vector has no direction); then the anchor, the sample with the fewest two-expert tokens
  (summed over layers; ties: shortest, then lowest id); then the others by the cosine similarity
  of their C to the anchor's, most similar first (similarities rounded to 9 decimals). Cosine
  ignores magnitude: with anchor [.05, 0, 0, 0], [.9, 0, 0, 0] comes right after it, while
  "5% in every layer" and "100% in every layer" tie.

* ``random``: uniform random keys, drawn anew each epoch from the seed, seen or not: a random
  data loader, the baseline the paper compares its curriculum against (with window 0, batches of
  random samples; with a window, random within fairseq's length buckets). Not a curriculum.

Unseen samples (never observed in training) get key +inf: they come last and are batched apart
from seen ones. Equal keys break by (length, id).

**The batches** (:func:`curriculum_batches`): with a window of W = 1 (default), they are
fairseq's own batches (cut from the length-sorted samples), ordered by their samples' mean key:
the batches and tokens per update are fairseq's, only their order changes. With W > 1, fairseq's
batches are taken W at a time; within each window the samples are sorted by key, and the
windows, one after the other, are cut again with fairseq's limits, so a batch holds samples of
similar length (as fairseq's) and similar complexity; then all batches are ordered by their
samples' mean key. A larger W makes batches more alike in complexity and adds padding: on 3,000 Multi30k pairs with random complexities, W = 1, 2, 4, 8,
16 gave 1.00, 1.05, 1.06, 1.09, 1.16x fairseq's padded tokens (batch counts 1.00 to 1.13x) and a
within-batch spread of complexity 1.0, 0.8, 0.48, 0.32, 0.16x fairseq's.
W = 0 orders all samples by key and cuts batches from that order (the paper's construction; the
batches then mix lengths, so there are more of them and each carries more padding).

Every rule is a total order on numbers that every rank holds identically, so every rank
computes the same order. Batches are sharded over ranks after ordering; consecutive batches
come from the same stretch of the order, so the micro-batches of one update (``--update-freq``)
and the ranks' batches of one step are alike. :func:`shuffle_in_buckets` optionally shuffles
whole steps within buckets.
"""

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

SAMPLE_COMPLEXITY_KEY = "_moe_sample_complexity"
"""The private logging-output key the criterion fills and the task pops before fairseq's
logging all-reduce (which would sum it)."""

SHUFFLE_MODES = ("none", "buckets")
ORDERS = ("mean", "cosine", "random")


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


def sample_keys(indices, multi, tokens, lengths=None, order: str = "mean",
                seed: int = 0) -> np.ndarray:
    """(M,) float64 sort keys of the samples ``indices`` (smallest first; rules in the module
    docstring): +inf for unseen samples; ``mean``: the mean of C over layers, in [0, 1];
    ``cosine``: -2 for zero vectors, -1 for the anchor, else 1 - cosine similarity, in [0, 2];
    ``random``: uniform in [0, 1) for every sample, from ``seed``.

    multi, tokens: (N, L) per-sample per-layer counts (a :class:`ComplexityTracker`'s, or None)
    lengths: (M,) lengths of ``indices``, for the cosine anchor's tie-break (default: equal)
    """
    if order not in ORDERS:
        raise ValueError(f"unknown curriculum order {order!r}; expected one of {ORDERS}")
    indices = np.asarray(indices, dtype=np.int64)
    if order == "random":
        return np.random.RandomState(seed % 2**32).random_sample(len(indices))
    keys = np.full(len(indices), np.inf)
    if multi is None or len(indices) == 0 or multi.shape[1] == 0:
        return keys
    lengths = np.zeros(len(indices), np.int64) if lengths is None else np.asarray(lengths)
    m = _as_numpy(multi)[indices].astype(np.float64)  # (M, L)
    t = _as_numpy(tokens)[indices].astype(np.float64)
    seen = t.sum(1) > 0
    c = m / np.maximum(t, 1.0)
    if order == "mean":
        keys[seen] = c[seen].mean(1)
        return keys
    n_multi = m.sum(1)
    nonzero = seen & (n_multi > 0)
    keys[seen & ~nonzero] = -2.0
    if nonzero.any():
        candidates = np.flatnonzero(nonzero)
        anchor = candidates[np.lexsort((indices[candidates], lengths[candidates],
                                        n_multi[candidates]))[0]]
        a = c[anchor]
        norms = np.linalg.norm(c, axis=1)
        # rounded, so that vectors equal up to float rounding tie (and break by length, id)
        sim = np.round((c @ a) / np.maximum(norms * np.linalg.norm(a), 1e-300), 9)
        keys[nonzero] = 1.0 - sim[nonzero]
        keys[anchor] = -1.0  # the anchor leads its group, whatever the rounding
    return keys


def curriculum_order(indices, multi, tokens, lengths=None, order: str = "cosine"
                     ) -> List[np.ndarray]:
    """Order one epoch's samples by complexity: ``[seen, unseen]``, two int64 arrays of sample
    ids, each sorted by (key, length, id) (:func:`sample_keys`). Batches cut from this order
    directly are the window-0 construction of :func:`curriculum_batches`.

    indices: (M,) sample ids of the epoch (after fairseq's size filter), any order
    multi, tokens: (N, L) per-sample per-layer counts (a :class:`ComplexityTracker`'s)
    lengths: (M,) tie-break lengths of ``indices`` (default: all equal)
    """
    indices = np.asarray(indices, dtype=np.int64)
    lengths = np.zeros(len(indices), np.int64) if lengths is None else np.asarray(lengths)
    keys = sample_keys(indices, multi, tokens, lengths, order)
    ordered = np.lexsort((indices, lengths, keys))
    seen = np.isfinite(keys[ordered])
    return [indices[ordered[seen]], indices[ordered[~seen]]]


def curriculum_batches(base_batches: Sequence, keys, lengths, cut: Callable, window: int
                       ) -> List[np.ndarray]:
    """One epoch's batches in curriculum order (the module docstring's construction).

    base_batches: fairseq's batches (arrays of sample ids), cut from the length-sorted samples
    keys, lengths: (N,) per sample id (:func:`sample_keys`, +inf = unseen; token counts)
    cut: sample ids in order -> batches, with fairseq's limits (``dataset.batch_by_size``)
    window: fairseq batches pooled and re-cut together (1: fairseq's batches as they are, only
            ordered; 0: all samples at once)
    """
    keys, lengths = np.asarray(keys, dtype=np.float64), np.asarray(lengths)
    if not len(base_batches):
        return []
    samples = [np.asarray(b, dtype=np.int64) for b in base_batches]
    if window == 1:  # fairseq's batches themselves, ordered by their seen samples' mean key
        return [samples[i] for i in np.lexsort((np.arange(len(samples)),
                                                [_mean_key(keys[b]) for b in samples]))]
    pools = [np.concatenate(samples)] if window <= 0 else \
        [np.concatenate(samples[i:i + window]) for i in range(0, len(samples), window)]
    # one stream, each window sorted by key, cut in one go: a window's last samples share a
    # batch with the next window's first instead of leaving a short batch behind; unseen
    # samples (key +inf) end their window, and they never share a batch with seen ones
    stream = [pool[np.lexsort((pool, lengths[pool], keys[pool]))] for pool in pools]
    stream = np.concatenate(stream)
    seen = np.isfinite(keys[stream])
    batches = []
    for part in (stream[seen], stream[~seen]):
        if len(part):
            batches.extend(np.asarray(b, dtype=np.int64) for b in cut(part))
    if window <= 0:  # already in order
        return batches
    means = np.array([keys[b].mean() for b in batches])  # inf for a batch of unseen samples
    return [batches[i] for i in np.lexsort((np.arange(len(batches)), means))]


def _mean_key(keys: np.ndarray) -> float:
    """A batch's key: the mean over its seen samples (+inf when none is seen)."""
    seen = keys[np.isfinite(keys)]
    return float(seen.mean()) if len(seen) else np.inf


def batch_loads(batches: Sequence, lengths, multi=None, tokens=None) -> np.ndarray:
    """(B,) estimated MoE slots of each batch: the sum over its samples of non-padding tokens
    times (1 + the sample's tracked share of tokens on a second expert, over all layers). Unseen
    samples count with the mean share of the seen ones (0 when nothing is seen yet).

    lengths: (N,) non-padding tokens per sample id; multi, tokens: (N, L) tracked counts or None
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    share = np.zeros(len(lengths))
    if multi is not None and multi.shape[1]:
        m = _as_numpy(multi).sum(1).astype(np.float64)
        t = _as_numpy(tokens).sum(1).astype(np.float64)
        seen = t > 0
        if seen.any():
            share[seen] = m[seen] / t[seen]
            share[~seen] = m[seen].sum() / t[seen].sum()
    per_sample = lengths * (1.0 + share)
    return np.array([per_sample[np.asarray(b, dtype=np.int64)].sum() for b in batches])


def balance_steps(batches: Sequence, loads, keys, num_shards: int, update_freq: int,
                  window_steps: int) -> list:
    """Re-pair batches into training steps so that the ranks of one step get similar work.

    fairseq hands batch ``(u * update_freq + k) * num_shards + r`` to rank r as micro-batch k
    of update u, so an update is a run of ``num_shards * update_freq`` consecutive batches.
    Within each window of ``window_steps`` updates (consecutive in the curriculum order), the
    batches are sorted by ``loads``, heaviest first, and dealt out an update at a time: the
    ``num_shards * update_freq`` next-heaviest form one update, dealt over its ranks in a
    snake (round k goes 0..P-1, round k + 1 back), so the ranks' sums are close. The window's
    updates are then ordered by their batches' mean key, keeping the curriculum order at the
    scale of windows. Same batches, same count; every rank computes the same result.

    loads: (B,) per batch (:func:`batch_loads`); keys: (N,) per sample id (:func:`sample_keys`)
    """
    if window_steps < 1 or num_shards < 2 or not len(batches):  # one rank: nothing to balance
        return list(batches)
    keys = np.asarray(keys, dtype=np.float64)
    loads = np.asarray(loads, dtype=np.float64)
    step = num_shards * update_freq
    span = step * window_steps
    out = []
    for start in range(0, len(batches), span):
        idx = np.arange(start, min(start + span, len(batches)))
        full = len(idx) - len(idx) % step  # a last partial update stays as it was
        heavy_first = idx[:full][np.lexsort((idx[:full], -loads[idx[:full]]))]
        updates = []
        for u in range(0, full, step):
            group = heavy_first[u:u + step]
            slots = [None] * step
            for k in range(update_freq):
                ranks = range(num_shards) if k % 2 == 0 else range(num_shards - 1, -1, -1)
                for j, r in enumerate(ranks):
                    slots[k * num_shards + r] = group[k * num_shards + j]
            updates.append(slots)
        means = [_mean_key(np.concatenate([keys[np.asarray(batches[i], dtype=np.int64)]
                                           for i in slots])) for slots in updates]
        for j in np.lexsort((np.arange(len(updates)), means)):
            out.extend(batches[i] for i in updates[j])
        out.extend(batches[i] for i in idx[full:])
    return out


def step_imbalance(batches: Sequence, loads, num_shards: int, update_freq: int) -> float:
    """Mean over full updates of the busiest rank's summed ``loads`` over the ranks' mean (the
    estimate of ``moe_rank_imbalance`` an order gives; 1.0 with one rank)."""
    loads = np.asarray(loads, dtype=np.float64)
    step = num_shards * update_freq
    if num_shards < 2 or len(batches) < step:
        return 1.0
    ratios = []
    for u in range(0, len(loads) - len(loads) % step, step):
        per_rank = loads[u:u + step].reshape(update_freq, num_shards).sum(0)
        if per_rank.mean() > 0:
            ratios.append(per_rank.max() / per_rank.mean())
    return float(np.mean(ratios)) if ratios else 1.0


def shuffle_in_buckets(batches: Sequence, bucket_steps: int, num_shards: int, seed: int) -> list:
    """Shuffle training steps within consecutive buckets of ``bucket_steps`` steps.

    A step is ``num_shards`` consecutive batches (pass ranks times ``--update-freq``: the batches
    of one update, as fairseq shards and groups them), kept together so that the ranks and the
    micro-batches of one update still train on batches of similar complexity. The batches themselves are not changed. Same seed -> same result on every rank.
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
