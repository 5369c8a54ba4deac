"""Dense FFN -> experts: the one conversion behind both ways a dense model becomes an MoE one.

* ``fairseq-train --arch adaptive_moe_bart* --restore-file DENSE``: ``AdaptiveMoEBARTModel``'s
  ``upgrade_state_dict_named`` runs :func:`dense_ffn_to_experts` on the state dict fairseq loads.
* ``adaptive-moe-upcycle`` (:func:`fairseq_adaptive_moe.tools.upcycle.upcycle`): the dense
  model's state dict through the same function, then noise, gate init and a strict check.

Both copy a layer's dense ``fc1``/``fc2`` into every expert with ``ExpertFFN.load_dense``, so the
same dense FFN gives the same experts either way. Plain PyTorch on state dicts: no fairseq import.
"""

from types import SimpleNamespace
from typing import List, Tuple

import torch
from torch import nn

from ..errors import AdaptiveMoEError
from ..moe import MoELayer

INIT_FROM_DENSE = ("copy", "random")


class MoECheckpointError(AdaptiveMoEError):
    """A state dict that does not fit the model's MoE layers. The message names the layer."""


def moe_layers(model: nn.Module) -> List[Tuple[str, MoELayer]]:
    """[(module name, MoELayer)] of ``model``, in module order (``encoder.layers.0.moe`` ...)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


@torch.no_grad()
def dense_ffn_to_experts(model: nn.Module, state_dict: dict, prefix: str = "",
                         init: str = "copy") -> List[str]:
    """Rewrite, in place, the dense FFN weights of ``state_dict`` for ``model``'s MoE layers.

    For each MoE layer ``X.moe`` of the model whose ``X.fc1.*`` / ``X.fc2.*`` are in the state dict,
    those four tensors are replaced by the MoE layer's own (``X.moe.gate.wg.weight``,
    ``X.moe.experts.*``): experts copied from the dense FFN (``init="copy"``) or left at their
    init (``"random"``), the gate at its init. The inserted tensors share storage with the model's
    parameters, so loading the state dict keeps them, and changing the model's experts in place
    (noise) changes them too. Layers already MoE in the state dict are checked (expert count, FFN
    size) and kept. Returns the converted layers' names (``X``); raises
    :class:`MoECheckpointError` on a mismatch.
    """
    if init not in INIT_FROM_DENSE:
        raise MoECheckpointError(f"--moe-init-from-dense must be one of {INIT_FROM_DENSE}, "
                                 f"got {init!r}")
    layers = moe_layers(model)
    moe_prefixes = {prefix + name + "." for name, _ in layers}
    for key in state_dict:
        if ".moe." in key and key.split(".moe.")[0] + ".moe." not in moe_prefixes:
            layer = key.split(".moe.")[0]
            raise MoECheckpointError(f"the checkpoint's {layer} is an MoE layer but this model's "
                                     "is dense (check --moe-freq and the layer counts)")
    converted = []
    for name, moe in layers:
        layer, here = prefix + name[: -len(".moe")], prefix + name + "."
        dense = {f"{fc}.{p}": f"{layer}.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}
        found = [k for k in dense.values() if k in state_dict]
        experts = moe.experts
        if any(k.startswith(here) for k in state_dict):
            if found:
                raise MoECheckpointError(f"the checkpoint's {layer} has both dense FFN and MoE "
                                         "weights")
            stored = state_dict.get(here + "experts.fc1_weight")
            if stored is not None and tuple(stored.shape) != tuple(experts.fc1_weight.shape):
                raise MoECheckpointError(
                    f"the checkpoint's {layer} has {stored.shape[0]} experts of shape "
                    f"{tuple(stored.shape[1:])}, this model {experts.num_experts} of shape "
                    f"{tuple(experts.fc1_weight.shape[1:])} (check --moe-expert-count and the "
                    "FFN dims)")
            continue
        if not found:
            continue  # nothing to convert; a strict load names the missing keys
        if len(found) != 4:
            raise MoECheckpointError(f"the checkpoint's {layer} has an incomplete dense FFN "
                                     f"({', '.join(found)})")
        fc1 = SimpleNamespace(weight=state_dict[dense["fc1.weight"]], bias=state_dict[dense["fc1.bias"]])
        fc2 = SimpleNamespace(weight=state_dict[dense["fc2.weight"]], bias=state_dict[dense["fc2.bias"]])
        want = (experts.ffn_dim, experts.embed_dim)
        if tuple(fc1.weight.shape) != want or tuple(fc2.weight.shape) != want[::-1]:
            raise MoECheckpointError(
                f"the checkpoint's {layer} FFN is {tuple(fc1.weight.shape[::-1])} (d, ffn), this "
                f"model's experts are {want[::-1]} (check the architecture's dims)")
        if init == "copy":
            experts.load_dense(fc1, fc2)
        for key in dense.values():
            del state_dict[key]
        for key, value in moe.state_dict().items():
            state_dict[here + key] = value  # live tensors: load_state_dict copies them onto themselves
        converted.append(layer)
    return converted
