"""MoE auxiliary losses and metrics shared by every criterion of this plugin.

A criterion calls :func:`moe_auxiliary_loss` and :func:`moe_logging_output` on the list of
``MoEStats`` in ``net_output[1]["moe_stats"]``, and :func:`reduce_moe_metrics` from its
``reduce_metrics``. Logged sums add up across batches and workers; ratios are derived at the end.

Metrics: ``moe_loss`` (the weighted auxiliary loss per ``sample_size`` unit), ``moe_2x`` (share of
routed tokens that used 2+ experts, all MoE layers), ``moe_2x_enc0``/``moe_2x_dec1``... (the same
per layer), ``moe_ept`` (expert slots per token: 1.0 = top-1 compute, 2.0 = top-2),
``moe_imbalance`` (max expert load / mean expert load, averaged over layers; 1.0 = balanced),
``moe_dropped`` (share of wanted slots dropped by a capacity limit; only with a capacity factor),
``moe_thr_enc0``/``moe_thr_dec1``... (the layer's threshold T, only under a two-expert budget,
``--moe-two-expert-budget``, where T changes while training; the token-weighted mean over the
logged updates), ``moe_a2a_mb`` (expert parallelism: MB of token rows all ranks sent to other ranks' experts per
update, forward; the backward pass sends as many gradient rows back), ``moe_a2a_wait_ms``
(expert parallelism: per update, the mean over ranks of the time a rank waited at the MoE
layers' first all-to-all, the split sizes, for the other ranks to arrive), ``moe_rank_imbalance``
(with 2+ data-parallel ranks: the busiest rank's MoE slots, non-padding tokens times experts
used summed over the MoE layers, over the mean over ranks, per update; 1.0 = every rank does
the same expert work, and every rank waits for the busiest at the gradient all-reduce and, with
expert parallelism, at the all-to-all).

Validation also logs ``loss_top1`` (and ``nll_loss_top1`` where the criterion logs ``nll_loss``,
``ppl_top1``): the task loss under top-1 gating, the paper's evaluation, beside ``loss`` under the
training gating, in the same units (:func:`reduce_top1_metrics`).

The per-layer sums stay on the device as 0-d tensors in the logging output: reading them in the
forward would stop the host between forward and backward on a GPU. :func:`reduce_moe_metrics`
reads them once per step, in one transfer.
"""

import math
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from fairseq import metrics, utils

from ..moe import MoEStats


#: the task-loss entries a validation forward under top-1 gating adds, as ``<key>_top1``
TOP1_KEYS = ("loss", "nll_loss")


def moe_auxiliary_loss(stats: Sequence[MoEStats], balance_weight: float, z_weight: float) -> Tensor:
    """``balance_weight * sum_l L_balance,l + z_weight * sum_l L_z,l`` over the MoE layers."""
    if not stats:
        return torch.zeros(())
    loss = balance_weight * torch.stack([s.balance_loss for s in stats]).sum()
    if z_weight > 0:
        loss = loss + z_weight * torch.stack([s.z_loss for s in stats]).sum()
    return loss


def short_name(name: str) -> str:
    """``encoder.0`` -> ``enc0``, ``decoder.3`` -> ``dec3``."""
    part, _, index = name.partition(".")
    return {"encoder": "enc", "decoder": "dec"}.get(part, part) + index


def moe_logging_output(stats: Sequence[MoEStats]) -> Dict[str, object]:
    """Per-layer sums for a logging output: 0-d tensors on the stats' device (no host sync)."""
    if not stats:
        return {}
    rows = []
    for s in stats:
        load = s.expert_load.float()
        rows.append(torch.stack([
            s.num_tokens.float(), s.num_multi.float(), load.sum(),
            load.max() * load.numel(), s.dropped_slots.float(),
        ]))
    values = torch.stack(rows)  # (layers, 5), read at reduce time
    out: Dict[str, object] = {}
    for s, (tokens, multi, slots, max_load_x_e, dropped) in zip(stats, values):
        n = short_name(s.name)
        out[f"moe_tokens_{n}"] = tokens
        out[f"moe_multi_{n}"] = multi
        out[f"moe_slots_{n}"] = slots
        out[f"moe_maxload_{n}"] = max_load_x_e
        out[f"moe_dropped_{n}"] = dropped
        if s.threshold is not None:  # T x tokens: sums over batches and ranks like the counts
            out[f"moe_thrsum_{n}"] = s.threshold.float() * tokens
    # expert parallelism: every rank has these keys (fairseq's reduction sums key by key);
    # host figures, read by the exchange anyway
    if any(s.expert_parallel for s in stats) or any(s.bytes_sent for s in stats):
        out["moe_a2a_bytes"] = float(sum(s.bytes_sent for s in stats))
        out["moe_a2a_wait_s"] = float(sum(s.a2a_wait_s for s in stats))
    out.update(rank_slots(values[:, 2].sum()))
    return out


RANK_SLOTS = "moe_rankslots_r"


def rank_slots(slots: Tensor) -> Dict[str, Tensor]:
    """This rank's MoE slots under its own key, ``moe_rankslots_r<rank>``, and a zero under every
    other rank's: fairseq sums logging outputs over ranks key by key, so after its reduction each
    key holds one rank's slots, and the reduction itself carries them (no collective or host read
    of our own). Empty with one data-parallel rank."""
    from fairseq.distributed import utils as distributed_utils

    world = distributed_utils.get_data_parallel_world_size()
    if world <= 1:
        return {}
    rank = distributed_utils.get_data_parallel_rank()
    zero = torch.zeros_like(slots)
    return {f"{RANK_SLOTS}{r}": slots if r == rank else zero for r in range(world)}


def _totals(logging_outputs: List[Dict], keys: Sequence[str]) -> Dict[str, float]:
    """Each key summed over the logging outputs, as floats; device tensors read in one transfer."""
    sums = [sum(log.get(k, 0) for log in logging_outputs) for k in keys]
    tensors = [i for i, v in enumerate(sums) if torch.is_tensor(v)]
    if tensors:
        read = torch.stack([sums[i].detach().double().reshape(()) for i in tensors]).tolist()
        for i, v in zip(tensors, read):
            sums[i] = v
    return {k: float(v) for k, v in zip(keys, sums)}


def reduce_moe_metrics(logging_outputs: List[Dict], sample_size: float) -> None:
    """Log the MoE metrics of a list of logging outputs (see the module docstring)."""
    keys = sorted({k for log in logging_outputs for k in log if k.startswith("moe_")})
    totals = _totals(logging_outputs, keys)
    sample_size = float(sample_size)

    def total(key):
        return totals.get(key, 0.0)

    if any("moe_a2a_bytes" in log for log in logging_outputs):
        metrics.log_scalar("moe_a2a_mb", total("moe_a2a_bytes") / 1e6, round=3)
    if any("moe_a2a_wait_s" in log for log in logging_outputs):
        from fairseq.distributed import utils as distributed_utils

        ranks = max(1, distributed_utils.get_data_parallel_world_size())
        metrics.log_scalar("moe_a2a_wait_ms", 1e3 * total("moe_a2a_wait_s") / ranks, round=2)
    ranks = sorted(k for k in keys if k.startswith(RANK_SLOTS))
    if ranks:
        per_rank = [total(k) for k in ranks]
        mean = sum(per_rank) / len(per_rank)
        if mean > 0:
            metrics.log_scalar("moe_rank_imbalance", max(per_rank) / mean, round=3)
    if any("moe_loss" in log for log in logging_outputs):
        metrics.log_scalar("moe_loss", total("moe_loss") / max(sample_size, 1), sample_size, round=4)
    layers = sorted({k[len("moe_tokens_"):] for log in logging_outputs for k in log
                     if k.startswith("moe_tokens_")}, key=lambda n: (n[:3], int(n[3:] or 0)))
    if not layers:
        return
    sums = {n: {f: total(f"moe_{f}_{n}") for f in ("tokens", "multi", "slots", "maxload", "dropped")}
            for n in layers}
    tokens = sum(v["tokens"] for v in sums.values())
    metrics.log_scalar("moe_2x", sum(v["multi"] for v in sums.values()) / max(tokens, 1), tokens,
                       round=4)
    metrics.log_scalar("moe_ept", sum(v["slots"] for v in sums.values()) / max(tokens, 1), tokens,
                       round=4)
    metrics.log_scalar("moe_imbalance", sum(v["maxload"] / max(v["slots"], 1) for v in sums.values())
                       / len(sums), tokens, round=3)
    dropped = sum(v["dropped"] for v in sums.values())
    if dropped > 0:
        wanted = dropped + sum(v["slots"] for v in sums.values())
        metrics.log_scalar("moe_dropped", dropped / wanted, tokens, round=4)
    for n, v in sums.items():
        metrics.log_scalar(f"moe_2x_{n}", v["multi"] / max(v["tokens"], 1), v["tokens"], round=4)
        if f"moe_thrsum_{n}" in totals and v["tokens"] > 0:
            metrics.log_scalar(f"moe_thr_{n}", total(f"moe_thrsum_{n}") / v["tokens"], v["tokens"],
                               round=6)


def reduce_top1_metrics(logging_outputs: List[Dict]) -> None:
    """Log ``loss_top1`` / ``nll_loss_top1`` / ``ppl_top1`` when the logging outputs carry the
    validation losses under top-1 gating, with the scaling fairseq's cross-entropy criterions
    give ``loss`` / ``nll_loss`` / ``ppl`` (base 2; ``loss`` per ``sample_size`` unit,
    ``nll_loss`` per token; without ``nll_loss``, per token when ``sample_size`` counts
    sentences)."""
    if not any("loss_top1" in log for log in logging_outputs):
        return
    totals = _totals(logging_outputs, ["loss_top1", "nll_loss_top1", "sample_size", "ntokens"])
    sample_size, ntokens = totals["sample_size"], totals["ntokens"]
    metrics.log_scalar("loss_top1", totals["loss_top1"] / max(sample_size, 1) / math.log(2),
                       sample_size, round=3)
    if any("nll_loss_top1" in log for log in logging_outputs):
        nll = totals["nll_loss_top1"]
    elif sample_size != ntokens:
        nll = totals["loss_top1"]
    else:
        metrics.log_derived("ppl_top1", lambda meters: utils.get_perplexity(meters["loss_top1"].avg))
        return
    metrics.log_scalar("nll_loss_top1", nll / max(ntokens, 1) / math.log(2), ntokens, round=3)
    metrics.log_derived("ppl_top1", lambda meters: utils.get_perplexity(meters["nll_loss_top1"].avg))
