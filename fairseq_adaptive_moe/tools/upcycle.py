"""``adaptive-moe-upcycle``: a dense fairseq transformer or BART checkpoint -> an adaptive MoE one.

Sparse upcycling (Komatsuzaki et al., 2022): every ``--moe-freq``-th encoder and decoder layer
gets ``--moe-expert-count`` experts, each a copy of that layer's dense FFN (``ExpertFFN.load_dense``).
All other weights are copied unchanged. The output is an ``adaptive_moe_transformer`` checkpoint
(from a ``transformer``) or an ``adaptive_moe_bart`` one (from a ``bart``: architecture
``adaptive_moe_bart_base`` / ``_large`` for ``bart_base`` / ``bart_large``, else
``adaptive_moe_bart``), with the dense model's dimensions; a BART's classification heads come
along.

Choices, and why:

* Combine weights default to ``renormalized`` (the used experts' probabilities divided by their
  sum). With identical experts a token's MoE output is then ``sum_j w_j FFN(x) = FFN(x)`` whatever
  the routing, so the upcycled model reproduces the dense model exactly before training (up to
  float rounding). With ``softmax`` weights the FFN output would be scaled by ``sum_j p_j < 1``.
* Gate: a new linear layer d -> E without bias. By default it gets ``nn.Linear``'s init,
  ``U(-1/sqrt(d), 1/sqrt(d))``, drawn after ``torch.manual_seed(--seed)``: the same init as a gate
  trained from scratch. ``--gate-init-std s`` draws ``N(0, s^2)`` instead; ``s = 0`` is a zero
  gate (uniform probabilities, so every token starts as a tie and adaptive gating sends it to
  two experts). Either way the dense outputs are reproduced.
* ``--noise-std r`` adds ``r * rms(W) * N(0, 1)`` to every expert copy of every FFN tensor W
  (independently per expert, seeded by ``--seed``) to break the symmetry between experts; the
  outputs then differ from the dense model's by about that much.
* No optimizer state is written (the dense optimizer's moments have no expert shapes), so train
  on with ``fairseq-train ... --restore-file OUT --reset-optimizer``; the tool prints the model
  flags that rebuild exactly this architecture.

Input: fairseq's ``transformer`` model (any of its architectures, e.g. ``transformer``,
``transformer_wmt_en_de_big``, ``transformer_wmt19_de_en``, ``transformer_tiny``), fairseq's
``bart`` (``bart_base``, ``bart_large``, ``mbart_*``), or an ``adaptive_moe_transformer`` /
``adaptive_moe_bart`` trained with ``--moe-freq 0``. (``fairseq-train --arch adaptive_moe_bart
--restore-file`` of a dense BART does the same conversion when loading, without this tool.)
"""

import argparse
import copy
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

PROG = "adaptive-moe-upcycle"
MOE_ARCH = "adaptive_moe_transformer"
MOE_BART_ARCH = "adaptive_moe_bart"


class UpcycleError(Exception):
    """Bad input: one line on stderr, exit status 2, nothing written."""


def build_parser() -> argparse.ArgumentParser:
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    from ..models.config import MoEConfig

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Turn a dense fairseq transformer (or BART) checkpoint into an "
                    "adaptive_moe_transformer (adaptive_moe_bart) checkpoint whose experts are "
                    "copies of the dense FFNs.",
        epilog="Continue training with fairseq-train DATA --user-dir fairseq_adaptive_moe "
               "--restore-file OUT --reset-optimizer and the model flags this tool prints.",
    )
    p.add_argument("dense", metavar="DENSE", help="dense fairseq checkpoint (.pt)")
    p.add_argument("--out", "-o", required=True, help="the MoE checkpoint to write (.pt)")
    p.add_argument("--data", default=None,
                   help="data-bin directory holding the checkpoint's dictionaries (default: the "
                        "data path stored in the checkpoint)")
    p.add_argument("--noise-std", type=float, default=0.0,
                   help="relative noise on each expert copy: W_e = W + r * rms(W) * N(0, 1), "
                        "independently per expert (default: 0, exact copies)")
    p.add_argument("--gate-init-std", type=float, default=None,
                   help="gate weights ~ N(0, std^2); default: nn.Linear's U(-1/sqrt(d), 1/sqrt(d)); "
                        "0 = zero gate (uniform gate probabilities)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the gate init and the noise (default: 1)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    moe = p.add_argument_group("MoE options (as fairseq-train's --moe-*)")
    gen_parser_from_dataclass(moe, MoEConfig())
    for action in moe._group_actions:
        if action.dest == "moe_expert_count":
            action.required, action.default = True, None
            action.help = "experts per MoE layer (required)"
        elif action.dest == "moe_combine_weights":
            action.default = "renormalized"
            action.help = ("combine weights (default: renormalized, so that identical experts "
                           "reproduce the dense FFN exactly; softmax scales it by sum p_j)")
    return p


def check_flags(args) -> None:
    from ..models.config import MoEConfigError, check_moe_args

    try:
        check_moe_args(args)
    except MoEConfigError as e:
        raise UpcycleError(str(e)) from None
    if args.moe_freq == 0:
        raise UpcycleError("--moe-freq 0 makes no MoE layer; give N >= 1 (layers N, 2N, ... "
                           "become MoE)")
    if not args.noise_std >= 0:
        raise UpcycleError(f"--noise-std must be >= 0, got {args.noise_std}")
    if args.gate_init_std is not None and not args.gate_init_std >= 0:
        raise UpcycleError(f"--gate-init-std must be >= 0, got {args.gate_init_std}")
    if not os.path.isfile(args.dense):
        raise UpcycleError(f"dense checkpoint not found: {args.dense}")
    if os.path.exists(args.out) and not args.force:
        raise UpcycleError(f"{args.out} exists; pass --force to overwrite it")
    if args.data is not None and not os.path.isdir(args.data):
        raise UpcycleError(f"--data directory not found: {args.data}")


def moe_options(args) -> dict:
    from ..models.config import MOE_DEFAULTS

    return {name: getattr(args, name) for name in MOE_DEFAULTS}


# ---- the dense checkpoint ----------------------------------------------------------------------

def load_dense(path: str, data: Optional[str]):
    """(state, cfg, MoE arch) of the dense checkpoint; UpcycleError unless it is a dense fairseq
    transformer or BART."""
    import fairseq_adaptive_moe  # noqa: F401  (registers the models; lets torch >= 2.6 load)
    from fairseq import checkpoint_utils

    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path, {"data": data} if data else None)
    except Exception as e:  # noqa: BLE001  (pickle, torch and omegaconf raise many kinds)
        raise UpcycleError(f"cannot read {path}: {_first_line(e)}") from None
    cfg = state.get("cfg")
    if cfg is None or cfg.get("model") is None or "model" not in state:
        raise UpcycleError(f"{path} is not a fairseq model checkpoint (no cfg.model / model)")
    return state, cfg, check_dense_arch(cfg.model, path)


def model_class(model_cfg):
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    name = getattr(model_cfg, "_name", None) or getattr(model_cfg, "arch", None)
    return name, ARCH_MODEL_REGISTRY.get(name) or MODEL_REGISTRY.get(name)


def check_dense_arch(model_cfg, path: str) -> str:
    """The MoE architecture the dense checkpoint becomes; UpcycleError if it cannot."""
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.models.bart import BARTModel
    from fairseq.models.transformer import TransformerModel

    from ..models import AdaptiveMoEBARTModel, AdaptiveMoETransformerModel

    name, cls = model_class(model_cfg)
    if cls is None:
        raise UpcycleError(f"{path}: unknown architecture {name!r} (is its --user-dir imported?)")
    if cls in (AdaptiveMoETransformerModel, AdaptiveMoEBARTModel):
        if getattr(model_cfg, "moe_freq", 1) != 0:
            raise UpcycleError(f"{path} is already an MoE checkpoint (arch {name}, --moe-freq "
                               f"{getattr(model_cfg, 'moe_freq', '?')}); give a dense one")
        return MOE_ARCH if cls is AdaptiveMoETransformerModel else name
    if cls is BARTModel:  # bart_base -> adaptive_moe_bart_base, ...
        moe_name = f"adaptive_moe_{name}"
        return moe_name if ARCH_MODEL_REGISTRY.get(moe_name) is AdaptiveMoEBARTModel else MOE_BART_ARCH
    if cls is not TransformerModel:
        raise UpcycleError(f"{path}: unsupported architecture {name!r} ({cls.__name__}); "
                           f"{PROG} upcycles fairseq 'transformer' and 'bart' checkpoints "
                           "(transformer, transformer_wmt19_de_en, transformer_tiny, bart_base, "
                           "bart_large, ...)")
    return MOE_ARCH


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---- the MoE model -----------------------------------------------------------------------------

def moe_model_args(dense_args, options: dict, arch: str = MOE_ARCH) -> argparse.Namespace:
    """The dense model's namespace (all its dimensions) as the MoE architecture ``arch``."""
    args = copy.deepcopy(dense_args)
    if not isinstance(args, argparse.Namespace):  # a dataclass-style model config
        args = argparse.Namespace(**dict(args))
    args.arch = args._name = arch
    for name, value in options.items():
        setattr(args, name, value)
    return args


@torch.no_grad()
def upcycle(dense_model, moe_model, noise_std: float, gate_init_std: Optional[float],
            seed: int) -> List[str]:
    """Copy ``dense_model`` into ``moe_model`` in place; returns the MoE layers' module names.

    Shared weights are copied by name; each MoE layer's experts are copies of the dense layer's
    fc1/fc2. Raises UpcycleError if any weight of either model is left without a counterpart.
    """
    from ..moe import MoELayer

    dense_state = dense_model.state_dict()
    moe_state = moe_model.state_dict()
    layers, used = [], set()
    noise = torch.Generator().manual_seed(seed + 1)
    gate_gen = torch.Generator().manual_seed(seed + 2)
    for name, module in moe_model.named_modules():
        if not isinstance(module, MoELayer):
            continue
        prefix = name[: -len(".moe")] if name.endswith(".moe") else name
        dense_layer = dense_model.get_submodule(prefix)
        fc1, fc2 = getattr(dense_layer, "fc1", None), getattr(dense_layer, "fc2", None)
        if fc1 is None or fc2 is None:
            raise UpcycleError(f"dense layer {prefix} has no fc1/fc2 FFN to copy")
        experts = module.experts
        if (fc1.weight.shape != experts.fc1_weight.shape[:0:-1]
                or fc2.weight.shape != experts.fc2_weight.shape[:0:-1]):
            raise UpcycleError(f"{prefix}: dense FFN {tuple(fc1.weight.shape)} does not fit the "
                               f"experts {tuple(experts.fc1_weight.shape[1:])}")
        experts.load_dense(fc1, fc2)
        if noise_std > 0:
            for tensor in (experts.fc1_weight, experts.fc1_bias, experts.fc2_weight, experts.fc2_bias):
                rms = tensor[0].float().pow(2).mean().sqrt()
                for e in range(tensor.shape[0]):
                    tensor[e].add_((noise_std * rms * torch.randn(tensor.shape[1:], generator=noise))
                                   .to(tensor.dtype))
        if gate_init_std is not None:
            w = module.gate.wg.weight
            w.copy_(torch.randn(w.shape, generator=gate_gen) * gate_init_std)
        used.update(f"{prefix}.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias"))
        layers.append(name)

    new_state = {}
    for key, value in moe_state.items():
        if key in dense_state:
            if dense_state[key].shape != value.shape:
                raise UpcycleError(f"{key}: dense shape {tuple(dense_state[key].shape)} != MoE "
                                   f"shape {tuple(value.shape)}")
            new_state[key] = dense_state[key]
        elif ".moe." in key:
            new_state[key] = value
        else:
            raise UpcycleError(f"the MoE model's {key} has no dense counterpart")
    left = sorted(set(dense_state) - set(moe_state) - used)
    if left:
        raise UpcycleError(f"dense weights with no place in the MoE model: {', '.join(left[:5])}"
                           + (" ..." if len(left) > 5 else ""))
    moe_model.load_state_dict(new_state, strict=True)
    return layers


def train_flags(moe_args) -> List[str]:
    """The fewest fairseq-train model flags that rebuild ``moe_args``'s architecture.

    Parsed as fairseq-train does (model flags default to unset, then the architecture function
    fills them); a flag is kept only if dropping it would change a model option.
    """
    from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

    arch = moe_args.arch
    arch_function = ARCH_CONFIG_REGISTRY[arch]
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group(argument_default=argparse.SUPPRESS)
    ARCH_MODEL_REGISTRY[arch].add_args(group)
    actions = [a for a in group._group_actions if hasattr(moe_args, a.dest)]

    def differences(items) -> List[str]:
        ns = parser.parse_args([tok for item in items for tok in item])
        arch_function(ns)
        return [a.dest for a in actions if not _same(getattr(ns, a.dest, None),
                                                     getattr(moe_args, a.dest))]

    items = []
    for action in actions:
        value, flag = getattr(moe_args, action.dest), max(action.option_strings, key=len)
        if value is None or (action.nargs == 0 and not value):
            continue
        items.append([flag] if action.nargs == 0 else [flag, str(value)])
    for item in list(items):
        trial = [i for i in items if i is not item]
        if not differences(trial):
            items = trial
    left = differences(items)
    if left:  # e.g. an option that is on by default and off here: no flag turns it off
        print(f"{PROG}: warning: no fairseq-train flag sets {', '.join(left)} as in the "
              "checkpoint", file=sys.stderr)
    return ["--arch", arch] + [tok for item in items for tok in item]


def _same(a, b) -> bool:
    """Equal values; a few fairseq flags have no type (``--decoder-output-dim`` parses as text)."""
    if a == b or str(a) == str(b):
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        check_flags(args)
        state, cfg, arch = load_dense(args.dense, args.data)
        from fairseq import tasks

        try:
            task = tasks.setup_task(cfg.task)
        except Exception as e:  # noqa: BLE001  (missing dictionaries, unknown task, ...)
            raise UpcycleError(f"cannot set up task {cfg.task.get('_name')!r} from data "
                               f"{cfg.task.get('data')!r} ({_first_line(e)}); give --data DIR "
                               "holding the checkpoint's dictionaries") from None
        dense_cfg = copy.deepcopy(cfg.model)
        if arch != MOE_ARCH:  # BART: keep the classification heads (BART drops them otherwise)
            dense_cfg.load_checkpoint_heads = True
        dense_model = task.build_model(dense_cfg)
        try:
            dense_model.load_state_dict(state["model"], strict=True, model_cfg=dense_cfg)
        except RuntimeError as e:
            raise UpcycleError(f"{args.dense}: weights do not match the stored architecture: "
                               f"{_first_line(e)}") from None
        options = moe_options(args)
        moe_args = moe_model_args(cfg.model, options, arch)
        torch.manual_seed(args.seed)  # the gates' nn.Linear init
        moe_model = task.build_model(moe_args)
        for head, module in getattr(dense_model, "classification_heads", {}).items():
            moe_model.register_classification_head(head, module.out_proj.out_features,
                                                   module.dense.out_features)
        layers = upcycle(dense_model, moe_model, args.noise_std, args.gate_init_std, args.seed)
        if not layers:
            raise UpcycleError(f"--moe-freq {args.moe_freq} leaves no MoE layer in a "
                               f"{moe_args.encoder_layers}+{moe_args.decoder_layers}-layer model")
    except UpcycleError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2

    from omegaconf import OmegaConf

    flags = train_flags(moe_args)
    out_cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    out_cfg["model"] = moe_args
    gate_init = ("nn.Linear default U(-1/sqrt(d), 1/sqrt(d))" if args.gate_init_std is None
                 else f"N(0, {args.gate_init_std}^2)")
    record = dict(
        source=os.path.abspath(args.dense), command=shlex.join([PROG] + argv),
        moe_layers=layers, moe=options, noise_std=args.noise_std, gate_init=gate_init,
        seed=args.seed, train_flags=flags,
        note="no optimizer state: continue with fairseq-train --restore-file ... --reset-optimizer",
    )
    out_state = {
        "args": None,
        "cfg": out_cfg,
        "model": moe_model.state_dict(),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "none (upcycled)", "optimizer_name": "none (upcycled)",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "task_state": state.get("task_state", {}),
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": True,
                                           "version": 2},
                        "upcycle": record},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(out_state, tmp)
    os.replace(tmp, out)

    sides = {}
    for name in layers:
        side, _, index = name.split(".")[:3]
        sides.setdefault(side, []).append(int(index))
    where = ", ".join(f"{side} layers {idx}" for side, idx in sides.items())
    print(f"{PROG}: wrote {out}: {arch}, {args.moe_expert_count} experts in {where}; "
          f"combine weights {args.moe_combine_weights}, noise {args.noise_std}, gate init "
          f"{gate_init}, seed {args.seed}; no optimizer state")
    if args.moe_combine_weights != "renormalized" or args.moe_capacity_factor > 0:
        print(f"{PROG}: note: with softmax combine weights or a capacity limit the upcycled model "
              "does not reproduce the dense outputs")
    print(f"{PROG}: continue training with:\n  fairseq-train DATA --user-dir fairseq_adaptive_moe "
          f"--task {cfg.task.get('_name')} {shlex.join(flags)} --criterion "
          f"adaptive_moe_label_smoothed_cross_entropy --restore-file {shlex.quote(str(out))} "
          "--reset-optimizer ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
