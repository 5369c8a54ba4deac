"""The fairseq methods this plugin copies, pinned to the fairseq they were copied from.

Some fairseq forwards have no hook where an MoE layer's statistics or its FFN could go in, so the
plugin carries copies of them (each says where it comes from; the lines it changes end in
``# MoE:``). :data:`PINNED_SHA256` holds the hash of each upstream method's source in the pinned
fairseq; :func:`check_copies` names the methods whose source in the installed fairseq differs,
which is when a copy must be re-synced. Only the pinned fairseq is compared: the hashes say
nothing about another version.

Re-syncing one copy: diff the new upstream source against the copy, carry the upstream change
over (keeping the ``# MoE:`` lines), then store ``source_sha256(upstream_source(name))`` here.
"""

import hashlib
import importlib
import inspect
from typing import Callable, Dict, Mapping, Optional, Tuple

PINNED_DISTRIBUTION = "fairseq-fixed"
PINNED_VERSION = "0.12.3.1"

# upstream method ("module:Class.method") -> sha256 of its source (see source_sha256)
PINNED_SHA256: Dict[str, str] = {
    "fairseq.models.transformer.transformer_encoder:TransformerEncoderBase.forward_scriptable":
        "ee13db99e9570bd447bb51832d74c44d17d8fff497e9823a6340feb2a5d61ddf",
    "fairseq.models.transformer.transformer_decoder:TransformerDecoderBase.extract_features_scriptable":
        "47387c47d39de5548a5262bb257dad227807c10d6615d942486974440582d281",
    "fairseq.modules.transformer_layer:TransformerEncoderLayerBase.forward":
        "c23b3c978d8d746a6aac0ebb616ede20501dfeec56dd5ae2024f2b1791f849e2",
    "fairseq.modules.transformer_layer:TransformerDecoderLayerBase.forward":
        "a66640cba96489573c11f1ec6b092f3b79629970fa7af873f24bb4c9b4fac9a9",
    "fairseq.models.transformer.transformer_base:TransformerModelBase.forward":
        "d4f887a9ca7c90ec6c6024139748e8f4f68b9d74d831f4672ab821c1a375aa28",
    "fairseq.models.bart.model:BARTModel.forward":
        "e887c3a5ecc14acf577d89eb47fe7f1dba5b8da0ec93ff9e8f64ec3e9eb75529",
    "fairseq.models.transformer_lm:TransformerLanguageModel.build_model":
        "0335c9365b4443af2383957cb7416ae7f2394e01d31d8d81f05a6a25ec8233e1",
}

# upstream method -> this plugin's copies of it ("module:qualname")
COPIES: Dict[str, Tuple[str, ...]] = {
    "fairseq.models.transformer.transformer_encoder:TransformerEncoderBase.forward_scriptable": (
        "fairseq_adaptive_moe.models.adaptive_moe_transformer:"
        "AdaptiveMoETransformerEncoder.forward_scriptable",),
    "fairseq.models.transformer.transformer_decoder:TransformerDecoderBase.extract_features_scriptable": (
        "fairseq_adaptive_moe.models.adaptive_moe_transformer:"
        "AdaptiveMoETransformerDecoder.extract_features_scriptable",),
    "fairseq.modules.transformer_layer:TransformerEncoderLayerBase.forward": (
        "fairseq_adaptive_moe.models.layers:MoETransformerEncoderLayer.forward",
        "fairseq_adaptive_moe.models.layers:MoEFFNMixin.moe_ffn_sublayer"),
    "fairseq.modules.transformer_layer:TransformerDecoderLayerBase.forward": (
        "fairseq_adaptive_moe.models.layers:MoETransformerDecoderLayer.forward",
        "fairseq_adaptive_moe.models.layers:MoEFFNMixin.moe_ffn_sublayer"),
    "fairseq.models.transformer.transformer_base:TransformerModelBase.forward": (
        "fairseq_adaptive_moe.models.adaptive_moe_transformer:AdaptiveMoETransformerModel.forward",
        "fairseq_adaptive_moe.models.adaptive_moe_transformer:encode_decode"),
    "fairseq.models.bart.model:BARTModel.forward": (
        "fairseq_adaptive_moe.models.adaptive_moe_bart:AdaptiveMoEBARTModel.forward",
        "fairseq_adaptive_moe.models.adaptive_moe_transformer:encode_decode"),
    "fairseq.models.transformer_lm:TransformerLanguageModel.build_model": (
        "fairseq_adaptive_moe.models.adaptive_moe_transformer_lm:"
        "AdaptiveMoETransformerLanguageModel.build_model",),
}


def resolve(name: str):
    """The function a ``"module:Class.method"`` name points to."""
    module, _, qualname = name.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.unwrap(getattr(obj, "__func__", obj))


def upstream_source(name: str) -> str:
    """The source text of a ``"module:Class.method"`` in the installed code."""
    return inspect.getsource(resolve(name))


def source_sha256(source: str) -> str:
    """sha256 of a source text with trailing whitespace (per line and at the end) removed."""
    text = "\n".join(line.rstrip() for line in source.splitlines()).strip("\n")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def installed_fairseq() -> Tuple[str, str]:
    """(distribution, version) of the fairseq that ``import fairseq`` finds.

    The distribution is the installed one that ships the ``fairseq`` package (``fairseq-fixed``
    or ``fairseq``); its version is ``fairseq.__version__`` where no distribution is found."""
    import fairseq

    from importlib import metadata

    for dist in (PINNED_DISTRIBUTION, "fairseq"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "fairseq (no distribution)", str(getattr(fairseq, "__version__", "unknown"))


def is_pinned_fairseq() -> bool:
    """Whether the installed fairseq is the one the hashes were taken from."""
    import fairseq

    dist, version = installed_fairseq()
    return (dist, version) == (PINNED_DISTRIBUTION, PINNED_VERSION) and \
        str(getattr(fairseq, "__version__", "")) == PINNED_VERSION


def check_copies(read_source: Callable[[str], str] = upstream_source,
                 pinned: Mapping[str, str] = PINNED_SHA256) -> Optional[str]:
    """None when every pinned upstream method still has its pinned source; otherwise one line
    naming the methods whose copies to re-sync. ``read_source`` reads a method's source (the
    installed fairseq's by default)."""
    changed = [name for name, sha in pinned.items() if source_sha256(read_source(name)) != sha]
    if not changed:
        return None
    where = "; ".join(f"{name} (copied in {', '.join(COPIES.get(name, ('?',)))})" for name in changed)
    dist, version = installed_fairseq()
    return (f"fairseq source changed since {PINNED_DISTRIBUTION} {PINNED_VERSION} "
            f"(installed: {dist} {version}): re-sync {where}, then update its hash in "
            f"fairseq_adaptive_moe/models/upstream.py")
