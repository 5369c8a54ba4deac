#!/usr/bin/env python
"""Paper Table 3 / Table 5 at small scale: dense, top-1, top-2 and adaptive gating side by side.

Translation (BLEU, ``adaptive_moe_transformer``) or summarization (ROUGE, ``adaptive_moe_bart``
with fairseq's BART CNN/DM recipe, ``experiments.flags.bart_summarization_flags``, as
``examples/summarization/recipe.py`` trains): ``--task-kind``, by
default detected from the data-bin (``dict.source.txt`` = a data-bin from
``examples/summarization/prepare.py``).

Every scheme is trained with identical fairseq-train flags (``experiments.flags``) except the
gating:

- ``dense``: ``--moe-freq 0`` (no MoE layer, same code path);
- ``top1`` / ``top2``: ``--moe-gating top1`` / ``top2``;
- ``adaptive``: ``--moe-gating adaptive --moe-threshold T`` (``--threshold``, default 0.1);
- ``budget`` (only when named in ``--schemes``): adaptive gating with a two-expert budget,
  ``--moe-two-expert-budget S`` (``--budget``, default 0.2; several values give one run each,
  named ``budget-S<S>``), starting from ``--moe-threshold T`` (docs/budget.md).

``--threshold-probs softmax,renormalized`` trains the adaptive scheme once per threshold
reading (``--moe-threshold-probs``: T compared on the softmax over all experts, or on the
probabilities renormalized over the top two), named ``adaptive-softmax`` and
``adaptive-renormalized``; one reading is passed to the adaptive and budget runs.

``--sweep 0.05,0.1,0.2`` instead trains adaptive gating at each T (Table 5); schemes named with
``--schemes`` are then trained as well. Runs go one at a time, each with the same thread count
(``--threads``, as ``OMP_NUM_THREADS`` and ``torch.set_num_threads``), so their times compare.

Per run it records:

- training wall time to ``--max-update`` updates, measured in the training process around
  ``Trainer.train_step``; the time spent in validation is left out;
- the same clock at each validation (every ``--validate-interval-updates``), hence the time to a
  target valid loss: the first validation at or below it (``n/a`` if none). The target is
  ``--target-valid-loss``, by default the worst of the runs' best valid losses;
- the best valid loss; test sacreBLEU (``examples/translation/score.py``, beam ``--beam``), or for
  summarization
  ROUGE-1/2/L (``examples/summarization/score.py``, BART's generation settings: beam 4, lenpen 2,
  max-len-b 140, min-len 55, no-repeat-ngram 3, each changeable), with the training gating and
  with ``--model-overrides "{'moe_eval_gating': 'top1'}"`` (MoE runs only);
- the share of two-expert tokens: the last training epoch's ``train_moe_2x`` and the last
  validation's ``valid_moe_2x``, with the per-layer values;
- forward FLOPs per token of the whole model and of its MoE layers alone, from the checkpoint's
  model config, the data's mean sentence lengths and the routing measured in the last training
  epoch (``flops_count``).

FLOPs: ``fairseq_adaptive_moe.tools.flops`` (its docstring has the formula; docs/computation.md
explains it). Forward matmuls, a multiply-add is 2 FLOPs, embedding lookups 0; the output
projection (d x V per target token), attention with the decoder's causal halving, the encoder
attention's k/v projections once per source token, and per MoE layer ``1 + moe_2x_l`` experts per
token from the logged per-layer two-expert share (1 for top-1, 2 for top-2; for K > 2 the overall
``moe_ept``) plus the gate. One sentence pair has ``S`` source tokens (the data-bin's mean
training source sentence, cut at ``--max-source-positions``) and ``L`` target tokens (``wpb /
bsz`` of the last training epoch); ``flops_per_token`` is the pair's total over ``S + L``, and
``flops_moe_layers_per_token`` the FFN sublayers' part of it (experts and gates, or the dense
FFNs). Both are given against the reference run (``flops_vs_ref``, ``flops_moe_layers_vs_ref``).

The paper's rows beside the table are ``experiments.paper``'s (Table 3 for the task; Table 5 with
``--sweep``), its MoE rows evaluated with top-1 gating; the quality column under that protocol
(top-1 evaluation of every MoE run) comes first, the training gating's second.

Writes ``OUT/compare.md`` (the table, the machine and the command), ``OUT/compare.json`` and
``OUT/compare.png`` (BLEU, or ROUGE-L, against training time normalised to top-2, or to the
adaptive T = 0.1 run when no top-2 run is present), and each run's logs under ``OUT/runs/NAME/``. A run whose
``result.json`` (its completion marker) exists with the same training command is reused;
``--force`` reruns it. Bad input (a missing data-bin, an unknown scheme, a bad T) gets one line on
stderr and exit status 2, and nothing is written.

    python -m experiments.compare --data-bin data-bin --out compare-out --max-update 400
    python -m experiments.compare --data-bin data-bin/cnndm --out cmp-sum --max-update 300
"""

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fairseq_adaptive_moe.moe.routing import THRESHOLD_PROBS
from fairseq_adaptive_moe.tools import flops as fl_flops

from . import ROOT, child_env, module_argv
from . import flags as fl
from . import paper
from .flags import SCHEMES, USER_DIR, scheme_flags

BUDGET = "budget"
RUN_SCHEMES = SCHEMES + (BUDGET,)  # the default runs stay SCHEMES

PROG = "compare.py"
SCORE = {"translation": ROOT / "examples" / "translation" / "score.py",
         "summarization": ROOT / "examples" / "summarization" / "score.py"}
KINDS = ("auto", "translation", "summarization")
# per task kind: arch, lr, beam, max-len-b, min-len, lenpen, no-repeat-ngram-size
KIND_DEFAULTS = {
    "translation": dict(arch="adaptive_moe_transformer_tiny", lr=2e-3, beam=5, max_len_b=200,
                        min_len=1, lenpen=1.0, no_repeat_ngram_size=0),
    "summarization": dict(arch="adaptive_moe_bart_tiny", lr=1e-3, beam=4, max_len_b=140,
                          min_len=55, lenpen=2.0, no_repeat_ngram_size=3),
}
EVAL_KEYS = ("beam", "max_len_b", "min_len", "lenpen", "no_repeat_ngram_size")
PAPER_TASK = {"translation": ("translation", "WMT19 de-en"),
              "summarization": ("summarization", "CNN/DM")}


def paper_rows(task_kind):
    """The paper's Table 3 rows for the task kind (``experiments.paper``), each with a row
    ``name`` for compare.md and the printed ``time`` / ``flops`` / score (``bleu`` or
    ``rouge1``), plus ``flops_vs_top2`` from the table."""
    task, label = PAPER_TASK[task_kind]
    key = "bleu" if task_kind == "translation" else "rouge1"
    return [{"name": f"paper: {r['scheme']} ({label})", "scheme": r["scheme"],
             "time": f"{r['time']:.2f}x", "flops": r["flops"],
             "flops_vs_top2": round(paper.flops_ratio(task, r["scheme"]), 3),
             key: f"{r['score']:g}"} for r in paper.table3(task)]


class BadInput(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-bin", type=Path, required=True,
                   help="a data-bin made by examples/translation/prepare.py (with raw/test.en), "
                        "or by examples/summarization/prepare.py (with raw/test.target)")
    p.add_argument("--task-kind", choices=KINDS, default="auto",
                   help="translation (BLEU) or summarization (ROUGE, BART recipe); auto: "
                        "summarization iff the data-bin has dict.source.txt")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--schemes", default=None,
                   help="comma-separated subset of dense,top1,top2,adaptive,budget "
                        "(default: the first four; with --sweep: none besides the sweep)")
    p.add_argument("--threshold", default="0.1",
                   help="adaptive threshold T, the budget's starting T (0.1)")
    p.add_argument("--budget", default="0.2",
                   help="the budget scheme's --moe-two-expert-budget S, 0 < S < 1; "
                        "comma-separated: one run per value (0.2)")
    p.add_argument("--threshold-probs", default=None,
                   help="--moe-threshold-probs of the adaptive and budget runs: softmax or "
                        "renormalized; both, comma-separated, train one adaptive run per "
                        "reading (default: the plugin's default, not passed)")
    p.add_argument("--sweep", default=None,
                   help="comma-separated thresholds: train adaptive gating at each (Table 5)")
    p.add_argument("--arch", default=None, help="default: adaptive_moe_transformer_tiny, "
                   "summarization: adaptive_moe_bart_tiny")
    p.add_argument("--max-update", type=int, default=400)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=None,
                   help="default: 2e-3, summarization 1e-3 (from scratch; BART fine-tuning "
                        "from --restore-file wants about 3e-5)")
    p.add_argument("--warmup-updates", type=int, default=None,
                   help="inverse_sqrt warmup (default: min(400, max-update // 2)); "
                        "summarization: polynomial decay, min(500, max-update // 10)")
    p.add_argument("--restore-file", type=Path, default=None,
                   help="summarization: a dense BART checkpoint every run starts from (its "
                        "FFNs become the experts; optimizer, data loader and meters reset)")
    p.add_argument("--max-source-positions", type=int, default=None,
                   help="summarization: --truncate-source cuts articles there")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds: every run once per seed (named RUN-sSEED), each "
                        "normalised to the reference run of its own seed, plus a mean ± sd table "
                        "over the seeds (default: --seed alone)")
    p.add_argument("--validate-interval-updates", type=int, default=100)
    p.add_argument("--target-valid-loss", type=float, default=None,
                   help="default: the worst of the runs' best valid losses")
    p.add_argument("--target-at-update", type=int, default=None,
                   help="instead of --target-valid-loss: the reference run's (top2's) valid loss "
                        "at this update (a multiple of --validate-interval-updates, at most "
                        "--max-update); adding runs then does not move the target")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per run (2)")
    p.add_argument("--gpu", action="store_true",
                   help="train with --fp16 and generate on the GPU (default: CPU, fp32)")
    p.add_argument("--beam", type=int, default=None, help="beam at test (5; summarization 4)")
    p.add_argument("--max-len-b", type=int, default=None,
                   help="fairseq-generate --max-len-b (200; summarization 140)")
    p.add_argument("--min-len", type=int, default=None, help="--min-len (1; summarization 55)")
    p.add_argument("--lenpen", type=float, default=None, help="--lenpen (1; summarization 2.0)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="--no-repeat-ngram-size (0; summarization 3)")
    p.add_argument("--extra", default="", help="more fairseq-train flags, the same for every run")
    p.add_argument("--force", action="store_true", help="rerun runs that are already complete")
    return p.parse_args(argv)


def resolve_kind(args):
    """Fill the task kind and its defaults into ``args``."""
    if args.task_kind == "auto":
        args.task_kind = "summarization" if (args.data_bin / "dict.source.txt").is_file() \
            else "translation"
    for key, value in KIND_DEFAULTS[args.task_kind].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def reference(args):
    return args.data_bin / "raw" / ("test.target" if args.task_kind == "summarization" else "test.en")


def parse_threshold(text):
    try:
        t = float(text)
    except ValueError:
        raise BadInput(f"bad threshold {text!r}: not a number")
    if not math.isfinite(t) or t < 0:
        raise BadInput(f"bad threshold {text!r}: must be a finite number >= 0")
    return t


def parse_budgets(text):
    """The ``--budget`` values: distinct numbers strictly between 0 and 1; raises BadInput."""
    budgets = []
    for x in (x.strip() for x in text.split(",")):
        try:
            s = float(x)
        except ValueError:
            raise BadInput(f"bad budget {x!r}: not a number")
        if not 0 < s < 1:
            raise BadInput(f"bad budget {x!r}: must be between 0 and 1 (exclusive)")
        budgets.append(s)
    return list(dict.fromkeys(budgets))


def parse_threshold_probs(text):
    """The ``--threshold-probs`` readings (None: not given); raises BadInput."""
    if text is None:
        return [None]
    readings = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    for x in readings:
        if x not in THRESHOLD_PROBS:
            raise BadInput(f"bad --threshold-probs {x!r} (choose from {', '.join(THRESHOLD_PROBS)})")
    if not readings:
        raise BadInput("--threshold-probs needs at least one reading")
    return readings


def plan_runs(args):
    """[(name, scheme, T or None, S or None, threshold reading or None)] in run order; raises
    BadInput."""
    if not (args.data_bin / "dict.en.txt").is_file() and not any(args.data_bin.glob("dict.*.txt")):
        raise BadInput(f"no data-bin at {args.data_bin} (run examples/translation/prepare.py "
                       "first)")
    resolve_kind(args)
    if not reference(args).is_file():
        raise BadInput(f"{reference(args)} is missing (make the data-bin with "
                       f"examples/{args.task_kind}/prepare.py)")
    if args.restore_file is not None and (args.task_kind != "summarization"
                                          or not args.restore_file.is_file()):
        raise BadInput(f"--restore-file {args.restore_file}: " + (
            "not found" if args.task_kind == "summarization" else "summarization only"))
    if args.target_at_update is not None:
        if args.target_valid_loss is not None:
            raise BadInput("--target-at-update and --target-valid-loss: give one of them")
        n, every = args.target_at_update, args.validate_interval_updates
        if n <= 0 or n > args.max_update or n % every:
            raise BadInput(f"--target-at-update {n}: must be a multiple of "
                           f"--validate-interval-updates ({every}) in [1, --max-update "
                           f"{args.max_update}]")
    if args.gpu:
        import torch
        if not torch.cuda.is_available():
            raise BadInput("--gpu: no CUDA device is available")
    for flag in ("max_update", "max_tokens", "validate_interval_updates", "threads", "beam"):
        if getattr(args, flag) < 1:
            raise BadInput(f"--{flag.replace('_', '-')} must be >= 1")
    threshold = parse_threshold(args.threshold)
    default = "" if args.sweep is not None else ",".join(SCHEMES)
    schemes = [s.strip() for s in (args.schemes if args.schemes is not None else default).split(",")
               if s.strip()]
    for s in schemes:
        if s not in RUN_SCHEMES:
            raise BadInput(f"unknown scheme {s!r} (choose from {', '.join(RUN_SCHEMES)})")
    budgets = parse_budgets(args.budget)
    readings = parse_threshold_probs(args.threshold_probs)
    runs = []
    for s in dict.fromkeys(schemes):
        if s == BUDGET:
            runs += [(BUDGET if len(budgets) == 1 else f"budget-S{b:g}", BUDGET, threshold, b,
                      readings[0]) for b in budgets]
        elif s == "adaptive":
            runs += [(s if len(readings) == 1 else f"{s}-{r}", s, threshold, None, r)
                     for r in readings]
        else:
            runs.append((s, s, None, None, None))
    if args.sweep is not None:
        ts = [parse_threshold(x.strip()) for x in args.sweep.split(",") if x.strip()]
        if not ts:
            raise BadInput("--sweep needs at least one threshold")
        runs = [r for r in runs if r[1] != "adaptive"]
        runs += [(f"adaptive-T{t:g}", "adaptive", t, None, readings[0]) for t in dict.fromkeys(ts)]
    if not runs:
        raise BadInput("nothing to run")
    return runs


def parse_seeds(args):
    if args.seeds is None:
        return [args.seed]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"--seeds {args.seeds!r}: not a comma-separated list of integers")
    if not seeds or len(set(seeds)) != len(seeds):
        raise BadInput(f"--seeds {args.seeds!r}: needs distinct seeds")
    return seeds


def train_flags(args, scheme, threshold, save_dir, seed=None, budget=None, probs=None):
    """The fairseq-train flags of one run; the budget scheme is adaptive gating plus
    ``--moe-two-expert-budget S``; ``probs``: the ``--moe-threshold-probs`` reading, if any."""
    seed = args.seed if seed is None else seed
    gating_flags = []  # what the scheme adds to plain adaptive gating
    if scheme == BUDGET:
        scheme, gating_flags = "adaptive", ["--moe-two-expert-budget", f"{budget:g}"]
    if probs is not None:
        gating_flags += ["--moe-threshold-probs", probs]
    if args.task_kind == "summarization":
        return fl.bart_summarization_flags(
            args.data_bin, save_dir, scheme, threshold, args.arch, args.max_update,
            args.max_tokens, args.lr, args.warmup_updates, args.max_source_positions, seed,
            args.restore_file, cpu=not args.gpu,
            validate_interval_updates=args.validate_interval_updates,
            extra=(["--fp16"] if args.gpu else []) + gating_flags + shlex.split(args.extra))
    warmup = args.warmup_updates if args.warmup_updates is not None else \
        max(1, min(400, args.max_update // 2))
    flags = (fl.translation_recipe(args.data_bin, args.arch, args.lr, warmup)
             + ["--max-tokens", str(args.max_tokens), "--max-update", str(args.max_update)]
             + fl.validation_flags(args.validate_interval_updates) + ["--no-epoch-checkpoints"]
             + fl.device_flags(args.gpu) + ["--seed", str(seed), "--save-dir", str(save_dir)]
             + fl.log_flags(10))
    return flags + scheme_flags(scheme, threshold) + gating_flags + shlex.split(args.extra)


def env_for(args):
    """The children's environment: ``--threads`` threads, the clone's root on PYTHONPATH."""
    return child_env(args.threads)


def check_call(cmd, log, env):
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                              env=env, text=True)
    if proc.returncode != 0:
        tail = Path(log).read_text(errors="replace").strip().splitlines()[-1:] or [""]
        name = cmd[2] if len(cmd) > 2 and cmd[1] == "-m" else Path(cmd[0]).name
        raise RuntimeError(f"{name} failed ({proc.returncode}), see {log}: {tail[0]}")


def records(log, tag):
    out = []
    for line in Path(log).read_text(errors="replace").splitlines():
        if f"| {tag} | " in line:
            try:
                out.append(json.loads(line.split(f"| {tag} | ", 1)[1]))
            except ValueError:
                pass
    return out


def share_curve(log):
    """[{"update", "share"}]: the two-expert share of each ``train_inner`` log line (every
    ``--log-interval`` updates) of a run's train.log; empty for a dense run."""
    return [{"update": int(r["num_updates"]), "share": float(r["moe_2x"])}
            for r in records(log, "train_inner") if "moe_2x" in r and "num_updates" in r]


def curve_lines(results, points=8):
    """The two-expert share over training of the threshold-routed runs (adaptive, budget): a
    table with up to ``points`` columns of logged updates, the last one included."""
    runs = [r for r in results if r["scheme"] in ("adaptive", BUDGET) and r.get("train_moe_2x_curve")]
    if not runs:
        return []
    updates = sorted({p["update"] for r in runs for p in r["train_moe_2x_curve"]})
    step = max(1, math.ceil(len(updates) / points))
    cols = updates[::-1][::step][::-1]
    lines = ["", "Two-expert share over training (the `train_inner` log lines, every "
             "`--log-interval` updates; top-2 is 1 and top-1 0 throughout):", "",
             "| run | " + " | ".join(f"@{u}" for u in cols) + " |", "|---|" + "---|" * len(cols)]
    for r in runs:
        at = {p["update"]: p["share"] for p in r["train_moe_2x_curve"]}
        lines.append(f"| {r['name']} | " + " | ".join(fmt(at.get(u), ".3f") for u in cols) + " |")
    return lines


def layer_shares(rec, prefix, metric="moe_2x"):
    """{'enc0': share, ...} from a json record's ``{prefix}_moe_2x_<layer>`` keys (or another
    per-layer ``metric``, e.g. the budget's ``moe_thr``)."""
    key = f"{prefix}_{metric}_"
    return {k[len(key):]: float(v) for k, v in rec.items() if k.startswith(key)}


def model_config(ckpt):
    """The dimensions that the FLOPs formula needs, from the checkpoint's saved config."""
    import fairseq_adaptive_moe  # noqa: F401  (lets torch.load read fairseq checkpoints)
    from fairseq import checkpoint_utils

    state = checkpoint_utils.load_checkpoint_to_cpu(str(ckpt))
    cfg = state["cfg"]["model"] if state.get("cfg") is not None else state["args"]
    get = (lambda k, d=None: getattr(cfg, k, d)) if not isinstance(cfg, dict) else cfg.get
    return {
        "encoder_layers": int(get("encoder_layers")), "decoder_layers": int(get("decoder_layers")),
        "encoder_embed_dim": int(get("encoder_embed_dim")),
        "decoder_embed_dim": int(get("decoder_embed_dim")),
        "encoder_ffn_embed_dim": int(get("encoder_ffn_embed_dim")),
        "decoder_ffn_embed_dim": int(get("decoder_ffn_embed_dim")),
        "moe_freq": int(get("moe_freq", 0) or 0), "moe_expert_count": int(get("moe_expert_count", 0)),
        "moe_max_experts": int(get("moe_max_experts", 2) or 2),
        "moe_gating": get("moe_gating"), "moe_threshold": get("moe_threshold"),
        "vocab": checkpoint_vocab(state),
    }


def checkpoint_vocab(state):
    """Rows of the decoder's output projection (its tied embedding) in a checkpoint; None if
    absent."""
    for key in ("decoder.output_projection.weight", "decoder.embed_tokens.weight"):
        if key in state.get("model", {}):
            return int(state["model"][key].shape[0])
    return None


def dictionary_vocab(args):
    """The target dictionary's size from the data-bin (fairseq adds 4 specials to dict.*.txt);
    for runs recorded before the vocabulary was kept with them."""
    name = "dict.target.txt" if args.task_kind == "summarization" else "dict.en.txt"
    path = args.data_bin / name
    if not path.is_file():
        path = next(iter(sorted(args.data_bin.glob("dict.*.txt"))), None)
    if path is None:
        return None
    return 4 + sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def flops_count(cfg, shares, ctx_len, src_len, ept=None):
    """The whole model's forward FLOPs of one sentence pair (``fairseq_adaptive_moe.tools.flops``):
    ``src_len`` source and ``ctx_len`` target tokens; per MoE layer ``1 + share`` experts per
    token from ``shares`` (``enc<i>`` / ``dec<i>``), or ``ept`` for every layer when K > 2."""
    shape = fl_flops.Shape.from_config(cfg)
    if cfg["moe_max_experts"] <= 2 or ept is None:
        experts = {f"{side}{i}": 1.0 + shares.get(f"{side}{i}", 0.0)
                   for side, n in (("enc", shape.encoder_layers), ("dec", shape.decoder_layers))
                   for i in range(n)}
    else:
        experts = ept
    return fl_flops.forward_flops(shape, src_len, ctx_len, experts)


def mean_source_length(args):
    """The mean binarized training source sentence in tokens (with its end-of-sentence), cut
    where ``--truncate-source`` cuts summarization articles; None without a training source."""
    from fairseq.data import data_utils

    if args.task_kind == "summarization":
        prefix = args.data_bin / "train.source-target.source"
    else:  # prepare.py's train.de-en.de: fairseq reads train.SRC-TGT.SRC
        found = sorted(args.data_bin.glob("train.*-*.*.idx"))
        found = [f for f in found if f.name.split(".")[1].split("-")[0] == f.name.split(".")[2]]
        if not found:
            return None
        prefix = found[0].with_suffix("")
    dataset = data_utils.load_indexed_dataset(str(prefix), None)
    if dataset is None:
        return None
    sizes = [int(n) for n in dataset.sizes]  # read while the memory map is open
    del dataset
    limit = (args.max_source_positions or 1024) if args.task_kind == "summarization" else None
    return float(sum(n if limit is None else min(n, limit) for n in sizes) / len(sizes))


def generate_child(spec_path):
    """Run fairseq-generate in this process for each (output file, args) of a JSON spec: one
    Python start-up for both evaluations of a run."""
    import contextlib
    import logging

    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from fairseq import options
    from fairseq_cli import generate

    for out_path, argv in json.loads(Path(spec_path).read_text()):
        parser = options.get_generation_parser()
        gen_args = options.parse_args_and_arch(parser, input_args=argv)
        with open(out_path, "w") as out, contextlib.redirect_stdout(out):
            for handler in list(logging.root.handlers):  # fairseq logs to its output file
                logging.root.removeHandler(handler)
            generate.main(gen_args)
            for handler in list(logging.root.handlers):
                logging.root.removeHandler(handler)


def score(args, gen):
    """BLEU (a number) or, for summarization, the ROUGE record: the task's
    ``examples/<task>/score.py --json``, the script a user scores with."""
    scorer = subprocess.run([sys.executable, SCORE[args.task_kind], gen, reference(args), "--json"],
                            capture_output=True, text=True, env=env_for(args))
    if scorer.returncode != 0:
        raise RuntimeError(f"score.py failed: {scorer.stderr.strip()}")
    record = json.loads(scorer.stdout)
    return record if args.task_kind == "summarization" else record["bleu"]


def eval_settings(args):
    return {k: getattr(args, k) for k in EVAL_KEYS}


def generate_argv(args, checkpoint, gating):
    if args.task_kind == "summarization":
        record = json.loads((args.data_bin / "prepare.json").read_text()) \
            if (args.data_bin / "prepare.json").is_file() else {}
        return fl.bart_generate_flags(args.data_bin, checkpoint, gating, "test", record,
                                      cpu=not args.gpu, **eval_settings(args))
    argv = [str(args.data_bin), "--user-dir", str(USER_DIR), "--path", str(checkpoint),
            "--gen-subset", "test", "--max-tokens", "8000",
            "--post-process", "sentencepiece", "--required-batch-size-multiple", "1"]
    argv += [] if args.gpu else ["--cpu"]
    # (fairseq's batch_by_size drops the last few sentences at its default multiple of 8)
    for key, value in eval_settings(args).items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    # named even for "train": the checkpoint's own --moe-eval-gating default may be top1
    argv += ["--model-overrides", repr({"moe_eval_gating": gating})]
    return argv


def evaluate(args, run_dir, moe):
    """Test BLEU (ROUGE) with the training gating and, for MoE runs, with top-1 gating."""
    checkpoint = run_dir / "checkpoint_last.pt"
    evals = {g: generate_argv(args, checkpoint, g) for g in (("train", "top1") if moe else ("train",))}
    spec = [(str(run_dir / f"gen-{name}.txt"), argv) for name, argv in evals.items()]
    (run_dir / "generate.json").write_text(json.dumps(spec))
    check_call(module_argv("compare", "--generate", run_dir / "generate.json"),
               run_dir / "generate.log", env_for(args))
    return {name: score(args, run_dir / f"gen-{name}.txt") for name in evals}


def run_one(args, name, scheme, threshold, seed=None, base=None, budget=None, probs=None):
    seed = args.seed if seed is None else seed
    run_dir = args.out / "runs" / name
    marker = run_dir / "result.json"
    flags = train_flags(args, scheme, threshold, run_dir, seed, budget, probs)
    command = shlex.join(["fairseq-train"] + flags)
    if marker.is_file() and not args.force:
        prev = json.loads(marker.read_text())
        if prev.get("command") == command and prev.get("eval") == eval_settings(args) \
                and prev.get("threads") == args.threads:
            print(f"[{name}] complete, reused ({marker})", flush=True)
            return dict(prev, seed=seed, base=base or name, threshold_probs=probs)
        print(f"[{name}] settings changed: rerunning", flush=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    print(f"[{name}] + {command}", flush=True)
    timing = run_dir / "timing.jsonl"
    begin = time.perf_counter()
    check_call(module_argv("timed_train", timing, *flags), run_dir / "train.log", env_for(args))
    process_wall = time.perf_counter() - begin
    events = [json.loads(x) for x in timing.read_text().splitlines() if x.strip()]
    steps = [e for e in events if "valid_loss" not in e]
    valids = [e for e in events if "valid_loss" in e]
    train = records(run_dir / "train.log", "train")
    valid = records(run_dir / "train.log", "valid")
    if not steps or not train or not valid:
        raise RuntimeError(f"no training or validation records in {run_dir / 'train.log'}")
    last_train, last_valid = train[-1], valid[-1]
    cfg = model_config(run_dir / "checkpoint_last.pt")
    train_shares = layer_shares(last_train, "train")
    ctx_len = float(last_train["train_wpb"]) / float(last_train["train_bsz"])
    ept = float(last_train["train_moe_ept"]) if "train_moe_ept" in last_train else None
    print(f"[{name}] trained in {steps[-1]['train_wall_s']:.1f} s; generating", flush=True)
    scores = evaluate(args, run_dir, moe=scheme != "dense")
    result = {
        "name": name, "base": base or name, "seed": seed, "scheme": scheme,
        "threshold": threshold, "budget": budget, "threshold_probs": probs, "command": command,
        "eval": eval_settings(args), "threads": args.threads, "task_kind": args.task_kind,
        "updates": steps[-1]["update"], "epochs": int(last_train.get("epoch", 0)),
        "train_wall_s": steps[-1]["train_wall_s"], "process_wall_s": process_wall,
        "fairseq_train_wall_s": float(last_train["train_train_wall"])
        if "train_train_wall" in last_train else None,
        "valid": [{"update": v["update"], "loss": v["valid_loss"],
                   "train_wall_s": v["train_wall_s"]} for v in valids],
        "best_valid_loss": min(v["valid_loss"] for v in valids),
        **metric_fields(args, scores),
        "train_moe_2x": float(last_train["train_moe_2x"]) if "train_moe_2x" in last_train else None,
        "valid_moe_2x": float(last_valid["valid_moe_2x"]) if "valid_moe_2x" in last_valid else None,
        "train_moe_ept": ept,
        "train_moe_2x_layers": train_shares,
        "train_moe_2x_epochs": [float(r["train_moe_2x"]) for r in train if "train_moe_2x" in r],
        "train_moe_thr_layers": layer_shares(last_train, "train", "moe_thr") or None,
        "valid_moe_2x_layers": layer_shares(last_valid, "valid"),
        "model": cfg, "ctx_len": ctx_len,
    }
    marker.write_text(json.dumps(result, indent=1))
    return result


def metric_fields(args, scores):
    """``score`` / ``score_top1``: the plotted metric (BLEU, or ROUGE-L for summarization), and
    ``bleu`` / ``rouge`` with their ``_top1`` twins."""
    if args.task_kind == "summarization":
        return {"metric": "ROUGE-L", "rouge": scores["train"], "rouge_top1": scores.get("top1"),
                "score": scores["train"]["rougeL"],
                "score_top1": scores["top1"]["rougeL"] if "top1" in scores else None}
    return {"metric": "BLEU", "bleu": scores["train"], "bleu_top1": scores.get("top1"),
            "score": scores["train"], "score_top1": scores.get("top1")}


def machine(gpu=False):
    if gpu:
        import torch
        return f"{torch.cuda.get_device_name(0)}, Python {platform.python_version()}, " \
               f"torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch
        tv = torch.__version__
    except ImportError:
        tv = "?"
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, " \
           f"Python {platform.python_version()}, torch {tv}"


def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def protocol(r, key):
    """A run's score under the paper's protocol: top-1 evaluation for an MoE run, its only score
    for the dense one (``key``: ``bleu``, ``rouge`` or ``score``)."""
    top1 = r.get(f"{key}_top1")
    return r[key] if top1 is None else top1


def quality(args):
    """(the quality columns' header, a function giving a run's two cells, the scoring sentence):
    the paper's protocol (top-1 evaluation of MoE runs) first, the training gating second."""
    settings = ", ".join(f"{k} {v}" for k, v in eval_settings(args).items())
    if args.task_kind == "summarization":
        def cells(r):
            rouge = lambda x: "-" if x is None else "/".join(
                f"{x[m]:.2f}" for m in ("rouge1", "rouge2", "rougeL"))
            return f"{rouge(protocol(r, 'rouge'))} | {rouge(r['rouge'])}"
        return ("ROUGE-1/2/L, top-1 eval (paper) | ROUGE-1/2/L, training gating", cells,
                f"ROUGE: F1 x 100 (rouge-score, Porter stemmer) on `{reference(args)}`, {settings}")
    return ("BLEU, top-1 eval (paper) | BLEU, training gating",
            lambda r: f"{protocol(r, 'bleu'):.2f} | {r['bleu']:.2f}",
            f"BLEU: sacreBLEU on `{reference(args)}`, {settings}")


def add_ratios(results, ref_name):
    """Each run against the reference run of its own seed: ``time_vs_ref``, ``to_target_vs_ref``
    (None when either never reached the target), ``flops_vs_ref``."""
    for r in results:
        ref = next(x for x in results if x["base"] == ref_name and x["seed"] == r["seed"])
        r["time_vs_ref"] = r["train_wall_s"] / ref["train_wall_s"]
        r["flops_vs_ref"] = r["flops_per_token"] / ref["flops_per_token"]
        r["flops_moe_layers_vs_ref"] = \
            r["flops_moe_layers_per_token"] / ref["flops_moe_layers_per_token"]
        r["to_target_vs_ref"] = None if r["to_target"] is None or ref["to_target"] is None else \
            r["to_target"]["train_wall_s"] / ref["to_target"]["train_wall_s"]


def mean_sd(values, spec):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, spec)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{format(mean, spec)} ± {format(sd, spec)}"


def seed_summary(args, results, ref_name):
    """Markdown lines: mean ± sd over the seeds, one row per run name."""
    seeds = sorted({r["seed"] for r in results})
    metric = results[0]["metric"]
    lines = ["", f"Mean ± sd over seeds {', '.join(map(str, seeds))} (times and FLOPs against "
             f"`{ref_name}` of the same seed):", "",
             f"| run | T | {metric}, top-1 eval (paper) | {metric}, training gating | time to N "
             "updates vs ref | time to target vs ref | 2x share train | FLOPs vs ref | MoE-layer "
             "FLOPs vs ref |", "|---|---|---|---|---|---|---|---|---|"]
    for base in dict.fromkeys(r["base"] for r in results):
        rs = [r for r in results if r["base"] == base]
        lines.append(
            f"| {base} | {gating_value(rs[0])} "
            f"| {mean_sd([protocol(r, 'score') for r in rs], '.2f')} "
            f"| {mean_sd([r['score'] for r in rs], '.2f')} "
            f"| {mean_sd([r['time_vs_ref'] for r in rs], '.2f')} "
            f"| {mean_sd([r['to_target_vs_ref'] for r in rs], '.2f')} "
            f"({sum(r['to_target_vs_ref'] is not None for r in rs)}/{len(rs)} reached) "
            f"| {mean_sd([r['train_moe_2x'] for r in rs], '.3f')} "
            f"| {mean_sd([r['flops_vs_ref'] for r in rs], '.2f')} "
            f"| {mean_sd([r['flops_moe_layers_vs_ref'] for r in rs], '.2f')} |")
    return lines


def gating_value(r):
    """The T column: the threshold, or a budget run's ``S=<budget>`` (T is the controller's)."""
    value = f"S={r['budget']:g}" if r.get("budget") is not None else fmt(r["threshold"], "g")
    probs = r.get("threshold_probs")
    return value if probs is None else f"{value} ({probs})"


def paper_lines(args, ref_name):
    """The paper's Table 3 rows under the measured table, and Table 5 after a sweep."""
    task = PAPER_TASK[args.task_kind][0]
    share = paper.TEXT_TWO_EXPERT_SHARE.get(task)
    lines = []
    for p in paper_rows(args.task_kind):
        score = p.get("bleu") or f"ROUGE-1 {p['rouge1']}"
        two = {"dense": "-", "top1": "0", "top2": "1",
               "adaptive": f"{share:.3f} (text)" if share is not None else ""}[p["scheme"]]
        ratio = f"{p['flops_vs_top2']:.2f}x" if ref_name == "top2" else ""
        # the paper's time is to the same loss: under "time to target", norm.
        lines.append(f"| {p['name']} | {'0.1' if p['scheme'] == 'adaptive' else ''} | | | | "
                     f"{p['time']} | | {score} | | {two} | {p['flops']} (paper) | {ratio} | |")
    lines += ["", f"Paper rows: Table 3 ({paper.TASKS[task][0]}), every MoE row evaluated with "
              "top-1 gating, so it sits in the top-1 column; its time is to the same loss, so it "
              "sits under time to target; FLOPs vs ref is the table's printed FLOPs over "
              "top-2's. Where the paper's text disagrees with its table (translation: 25.6% "
              "less time and 38.2% less FLOPs in the text, 0.79x and 11.5G / 15.9G = 0.72x in the table), the table is used; "
              "the two-expert share is the text's. The list: `experiments/paper.py`."]
    if args.sweep is not None:
        lines += [""] + paper.markdown_table5(task)
    return lines


def render(args, results, target, ref_name, argv):
    ref = next(r for r in results if r["base"] == ref_name)
    header, cells, scoring = quality(args)
    lines = [
        f"# Gating schemes compared ({args.arch}, {args.max_update} updates)", "",
        f"Command: `python -m experiments.compare {shlex.join(argv)}`", "",
        f"Machine: {machine(args.gpu)}; "
        f"{'--fp16 training' if args.gpu else f'{args.threads} threads per run'}, "
        "runs one at a time.", "",
        f"Times are training wall clock (validation excluded), normalised to `{ref_name}`"
        f"{' of the same seed' if len({r['seed'] for r in results}) > 1 else ''}. "
        f"Target valid loss: {target:.3f}. {scoring}. FLOPs: the whole model's forward matmul "
        f"FLOPs per token (a multiply-add = 2, embedding lookups 0, output projection included), "
        f"the mean over a source sentence of {ref['src_len']:.1f} tokens and a target sentence "
        f"of {ref['ctx_len']:.1f}, from the config and the measured routing (last training "
        "epoch); MoE-layer FLOPs: the FFN sublayers alone (experts and gate, or the dense FFN); "
        "formula: `fairseq_adaptive_moe/tools/flops.py`, docs/computation.md.", "",
        "| run | T | time to N updates (s) | norm. | time to target (s, @update) | norm. | "
        f"best valid loss | {header} | 2x share train / valid | MFLOPs/token | "
        "FLOPs vs ref | MoE-layer FLOPs vs ref |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tt = r["to_target"]
        tt_s = "n/a" if tt is None else f"{tt['train_wall_s']:.1f} (@{tt['update']})"
        tt_n = fmt(r["to_target_vs_ref"], ".2f", "n/a") + ("x" if r["to_target_vs_ref"] else "")
        share = f"{fmt(r['train_moe_2x'], '.3f')} / {fmt(r['valid_moe_2x'], '.3f')}"
        lines.append(
            f"| {r['name']} | {gating_value(r)} | {r['train_wall_s']:.1f} | "
            f"{r['time_vs_ref']:.2f}x | {tt_s} | {tt_n} | "
            f"{r['best_valid_loss']:.3f} | {cells(r)} | "
            f"{share} | {r['flops_per_token'] / 1e6:.3f} | "
            f"{r['flops_vs_ref']:.2f}x | {r['flops_moe_layers_vs_ref']:.2f}x |")
    lines += paper_lines(args, ref_name)
    lines += curve_lines(results)
    if len({r["seed"] for r in results}) > 1:
        lines += seed_summary(args, results, ref_name)
    lines += ["", "Per-layer two-expert share (last training epoch):", "",
              "| run | " + " | ".join(sorted({k for r in results for k in r["train_moe_2x_layers"]}))
              + " |"]
    keys = sorted({k for r in results for k in r["train_moe_2x_layers"]})
    lines.append("|---|" + "---|" * len(keys))
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(
            fmt(r["train_moe_2x_layers"].get(k), ".3f") for k in keys) + " |")
    metric = results[0]["metric"]
    lines += ["", f"![{metric} vs normalised training time](compare.png)", ""]
    return "\n".join(lines)


def plot(results, ref_name, path):
    import logging

    import matplotlib
    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq's import logs at DEBUG
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        x = r["time_vs_ref"]
        ax.scatter([x], [r["score"]], s=40)
        ax.annotate(r["name"], (x, r["score"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
        if r["score_top1"] is not None:
            ax.scatter([x], [r["score_top1"]], s=40, facecolors="none", edgecolors="gray")
    ax.set_xlabel(f"training time to N updates / {ref_name}")
    ax.set_ylabel(f"test {results[0]['metric']}")
    ax.set_title("filled: training gating, hollow: top-1 gating at test", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def target_loss(args, results, ref_name):
    """The valid loss that "time to target" is measured to: ``--target-valid-loss``; or the
    reference run's valid loss at ``--target-at-update`` (the mean over seeds, so that every seed's
    runs share one target); or the worst of the runs' best valid losses."""
    if args.target_valid_loss is not None:
        return args.target_valid_loss
    if args.target_at_update is None:
        return max(r["best_valid_loss"] for r in results)
    losses = []
    for r in results:
        if r["base"] != ref_name:
            continue
        at = [v["loss"] for v in r["valid"] if v["update"] == args.target_at_update]
        if not at:
            raise BadInput(f"--target-at-update {args.target_at_update}: run {r['name']} has no "
                           f"validation at that update (validated at "
                           f"{[v['update'] for v in r['valid']]})")
        losses.append(at[0])
    return sum(losses) / len(losses)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        runs = plan_runs(args)
        seeds = parse_seeds(args)
    except BadInput as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    args.data_bin = args.data_bin.resolve()
    args.out = args.out.resolve()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for seed in seeds:
            for name, scheme, threshold, budget, probs in runs:
                run = f"{name}-s{seed}" if len(seeds) > 1 else name
                results.append(run_one(args, run, scheme, threshold, seed, name, budget, probs))
    except RuntimeError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1

    names = [r["base"] for r in results]
    ref_name = "top2" if "top2" in names else \
        next((r["base"] for r in results if r["scheme"] == "adaptive" and r["threshold"] == 0.1),
             names[0])
    try:
        target = target_loss(args, results, ref_name)
    except BadInput as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    src_len = mean_source_length(args)
    for r in results:
        first = next((v for v in r["valid"] if v["loss"] <= target), None)
        r["to_target"] = first
        r["train_moe_2x_curve"] = share_curve(args.out / "runs" / r["name"] / "train.log")
        # computed here, not stored with the run, so that a reused run gets today's formula
        if r["model"].get("vocab") is None:  # a run recorded before the vocabulary was kept
            r["model"]["vocab"] = dictionary_vocab(args)
        r["src_len"] = src_len if src_len is not None else r["ctx_len"]
        count = flops_count(r["model"], r["train_moe_2x_layers"], r["ctx_len"], r["src_len"],
                            r["train_moe_ept"])
        r["flops_per_token"] = count.per_token
        r["flops_moe_layers_per_token"] = count.ffn_per_token
        r["flops_per_layer"] = count.per_layer
        r["flops_breakdown"] = count.as_dict()
    add_ratios(results, ref_name)
    report = render(args, results, target, ref_name, argv)
    (args.out / "compare.md").write_text(report)
    (args.out / "compare.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "argv": argv,
        "machine": machine(args.gpu), "gpu": args.gpu, "target_valid_loss": target,
        "reference": ref_name,
        "paper_table3_wmt19_de_en": paper_rows("translation")
        if args.task_kind == "translation" else None,
        "paper": {"task": PAPER_TASK[args.task_kind][0],
                  "table3": paper_rows(args.task_kind),
                  "table5": paper.table5(PAPER_TASK[args.task_kind][0]),
                  "text_two_expert_share":
                      paper.TEXT_TWO_EXPERT_SHARE.get(PAPER_TASK[args.task_kind][0]),
                  "inconsistencies": paper.INCONSISTENCIES},
        "runs": results}, indent=1))
    try:
        plot(results, ref_name, args.out / "compare.png")
    except ImportError:  # e.g. a bare GPU host: compare.md and compare.json are the record
        print("note: matplotlib is not installed: no compare.png")
    print(report)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--generate":
        generate_child(sys.argv[2])
    else:
        sys.exit(main())
