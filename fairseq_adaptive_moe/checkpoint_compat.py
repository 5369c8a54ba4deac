"""Let fairseq load its own checkpoints under torch >= 2.6 without disabling ``weights_only``.

Since torch 2.6 ``torch.load`` defaults to ``weights_only=True``, which refuses the non-tensor
objects fairseq stores in every checkpoint (its argparse ``Namespace`` and omegaconf config).
This allow-lists exactly those types with ``torch.serialization.add_safe_globals``, so resume,
``fairseq-generate`` and ``fairseq-interactive`` work while other globals stay refused.
"""

import argparse
import collections
import typing

import torch


def _fairseq_checkpoint_types():
    # checkpoints written by fairseq 0.12 hold the argparse Namespace (``args`` and the legacy
    # models' ``cfg.model``); older ones pickled omegaconf containers with their metadata.
    types = [argparse.Namespace, collections.defaultdict, typing.Any]
    # multi-rank resume: rank 0 loads the checkpoint and fairseq's broadcast_object sends it to
    # the other ranks as a pickle of its non-tensor part, which they read with torch.load; that
    # pickle names plain builtin types (omegaconf's metadata holds object_type=dict, ...) and
    # fairseq's placeholder for the tensors sent separately
    types += [dict, list, tuple, set, str, int, float, bool, type(None)]
    try:
        from fairseq.distributed.utils import _TensorPlaceholder
        types.append(_TensorPlaceholder)
    except ImportError:  # no fairseq (the core alone), or one without the placeholder
        pass
    try:
        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import Box, Container, ContainerMetadata, Metadata, Node
        from omegaconf.nodes import (AnyNode, BooleanNode, EnumNode, FloatNode, IntegerNode,
                                     StringNode, ValueNode)
        types += [DictConfig, ListConfig, Box, Container, ContainerMetadata, Metadata, Node,
                  AnyNode, BooleanNode, EnumNode, FloatNode, IntegerNode, StringNode, ValueNode]
    except ImportError:  # omegaconf comes with fairseq; nothing to allow without it
        pass
    return types


def allow_fairseq_checkpoints() -> None:
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 has no allow-list, and its torch.load needs none
        add(_fairseq_checkpoint_types())


allow_fairseq_checkpoints()
