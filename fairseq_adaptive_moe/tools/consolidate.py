"""Consolidation: merge the per-rank shards of an expert-parallel checkpoint into one file, or
re-shard them to another expert-parallel size.

The library behind ``adaptive-moe-consolidate`` (:mod:`fairseq_adaptive_moe.cli.consolidate`);
from Python: ``consolidate(shard_paths("checkpoints/checkpoint_last.pt"), "model.pt", 1)``.

Training with ``--moe-expert-parallel-size P`` saves one file per shard, fairseq's checkpoint name
plus ``-ep{r}`` (``checkpoint_last-ep0.pt`` ... ``-ep{P-1}.pt``). Each holds the shared
parameters and experts ``[r*E/P, (r+1)*E/P)`` of every MoE layer. This tool:

* checks that the shards belong together: the same P, every shard present, and shared
  parameters bitwise equal across shards;
* concatenates each expert tensor (``ExpertFFN``'s stacked ``fc1_weight`` ... ``fc2_bias``, first
  dimension = experts) in shard order, and splits it again for ``--expert-parallel-size P2``;
* writes the model with ``moe_expert_parallel_size`` set to the new P2: P2 = 1 gives one file
  that ``fairseq-generate`` / ``fairseq-train --restore-file`` load in one process; P2 > 1
  gives ``OUT-ep0.pt`` ... which ``fairseq-train --restore-file OUT`` loads under P2.

The optimizer state is dropped, with a warning: it is stored by parameter index per shard, and
the dense Adam moments of the shared parameters alone would be a partial state. Resume a
re-sharded run with ``--reset-optimizer``; resuming under the same P needs no consolidation
(every rank reloads its own shard with its optimizer state). The training state (epoch,
iterator position, number of updates) is copied from shard 0.
"""

import copy
import os
import re
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..distributed.expert_parallel import parallel_size, shard_suffix
from ..moe.experts import EXPERT_PARAM_NAMES

EXPERT_KEY = re.compile(r"(^|\.)experts\.(" + "|".join(EXPERT_PARAM_NAMES) + r")$")
SHARD_NAME = re.compile(r"^(?P<base>.*)-ep(?P<rank>\d+)\.pt$")


class ConsolidateError(Exception):
    """Bad input (the message names the file or flag); raised before anything is written."""


def shard_paths(path: str) -> List[str]:
    """The shard files of ``path`` (a base name or one shard), in rank order; ``[path]`` for a
    one-file checkpoint."""
    match = SHARD_NAME.match(path)
    base = match.group("base") + ".pt" if match else path
    if not match and os.path.isfile(path):
        return [path]
    stem = base[:-3] if base.endswith(".pt") else base
    paths = []
    while os.path.isfile(f"{stem}{shard_suffix(len(paths))}.pt"):
        paths.append(f"{stem}{shard_suffix(len(paths))}.pt")
    if not paths:
        raise ConsolidateError(f"no checkpoint found: neither {path} nor its shards "
                               f"{stem}{shard_suffix(0)}.pt ...")
    return paths


def _model_cfg(state, path):
    cfg = state.get("cfg")
    model_cfg = cfg.get("model") if cfg is not None else None
    if model_cfg is None or "model" not in state:
        raise ConsolidateError(f"{path} is not a fairseq model checkpoint (no cfg.model / model)")
    return model_cfg


def _get(model_cfg, name, default=None):
    return model_cfg.get(name, default) if isinstance(model_cfg, dict) else getattr(model_cfg, name, default)


def _set(model_cfg, name, value):
    if isinstance(model_cfg, dict):
        model_cfg[name] = value
    else:
        setattr(model_cfg, name, value)


def load_shards(paths: Sequence[str]) -> List[dict]:
    """The shards' checkpoints, checked to be one expert-parallel MoE checkpoint of P shards."""
    states = []
    for path in paths:
        try:
            states.append(torch.load(path, map_location="cpu", weights_only=False))
        except Exception as e:  # noqa: BLE001  (pickle and torch raise many kinds)
            raise ConsolidateError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    sizes = [parallel_size(_model_cfg(s, p)) for s, p in zip(states, paths)]
    if len(set(sizes)) != 1:
        raise ConsolidateError(f"the shards disagree on --moe-expert-parallel-size: {sizes}")
    if sizes[0] != len(paths):
        raise ConsolidateError(f"{paths[0]} was trained with --moe-expert-parallel-size {sizes[0]} "
                               f"but {len(paths)} shard file(s) were found")
    if _get(_model_cfg(states[0], paths[0]), "moe_expert_count") is None:
        raise ConsolidateError(f"{paths[0]} is not an adaptive MoE checkpoint (no moe_expert_count)")
    return states


def merge_models(models: Sequence[Dict[str, torch.Tensor]], paths: Sequence[str]) -> Dict[str, torch.Tensor]:
    """One state dict: expert tensors concatenated in shard order, shared tensors checked equal."""
    keys = list(models[0])
    for m, path in zip(models[1:], paths[1:]):
        if list(m) != keys:
            raise ConsolidateError(f"{path} holds other parameters than {paths[0]}")
    merged = {}
    for key in keys:
        tensors = [m[key] for m in models]
        if EXPERT_KEY.search(key):
            merged[key] = torch.cat(tensors, 0)
        else:
            for t, path in zip(tensors[1:], paths[1:]):
                if t.shape != tensors[0].shape or not torch.equal(t, tensors[0]):
                    raise ConsolidateError(f"shared parameter {key} differs between {paths[0]} and "
                                           f"{path}: the shards are not from one training step")
            merged[key] = tensors[0]
    return merged


def split_model(model: Dict[str, torch.Tensor], size: int) -> List[Dict[str, torch.Tensor]]:
    """``size`` state dicts: expert tensors cut into equal consecutive chunks, the rest shared."""
    return [{k: (v.chunk(size, 0)[r].clone() if EXPERT_KEY.search(k) else v) for k, v in model.items()}
            for r in range(size)]


def output_paths(out: str, size: int) -> List[str]:
    """``[out]`` for one file, else the shard names ``OUT-ep0.pt`` ..."""
    if size == 1:
        return [out]
    stem = out[:-3] if out.endswith(".pt") else out
    return [f"{stem}{shard_suffix(r)}.pt" for r in range(size)]


def consolidate(paths: Sequence[str], out: str, size: int, force: bool = False,
                warn: Optional[Callable[[str], None]] = None) -> List[str]:
    """Merge ``paths`` (the shards, in rank order) and write ``size`` output shards; returns
    their paths. ``warn`` receives the warning that the optimizer state is dropped (default:
    :func:`warnings.warn`). Raises :class:`ConsolidateError` before writing anything."""
    if size < 1:
        raise ConsolidateError(f"--expert-parallel-size must be >= 1, got {size}")
    targets = output_paths(out, size)
    clash = [t for t in targets if os.path.abspath(t) in {os.path.abspath(p) for p in paths}]
    if clash:
        raise ConsolidateError(f"{clash[0]} is one of the input shards; choose another --out")
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not force:
        raise ConsolidateError(f"{existing[0]} exists; pass --force to overwrite it")
    states = load_shards(paths)
    model_cfg = _model_cfg(states[0], paths[0])
    experts = int(_get(model_cfg, "moe_expert_count"))
    if experts % size != 0:
        raise ConsolidateError(f"--expert-parallel-size {size} must divide the expert count {experts}")
    merged = merge_models([s["model"] for s in states], paths)
    if states[0].get("last_optimizer_state") is not None:
        (warn or warnings.warn)("the optimizer state is not carried over (stored per shard by "
                                "parameter index); continue training with --reset-optimizer")
    for target, model in zip(targets, split_model(merged, size)):
        state = copy.copy(states[0])
        state["model"] = model
        state["last_optimizer_state"] = None
        state["cfg"] = copy.deepcopy(states[0]["cfg"])
        _set(state["cfg"]["model"], "moe_expert_parallel_size", size)
        if state.get("args") is not None:
            state["args"] = copy.deepcopy(state["args"])
            _set(state["args"], "moe_expert_parallel_size", size)
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        tmp = target + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, target)
    return targets
