"""Routing analysis: which tokens take two experts, layer by layer (paper §4.5, Figs. 1-2).

The library behind ``adaptive-moe-routing`` (:mod:`fairseq_adaptive_moe.cli.routing`); from
Python, :func:`analyse` does what the command does and returns the summary::

    summary = analyse(RoutingOptions(data="data-bin", path="checkpoint_best.pt", out="report"))

Runs a trained ``adaptive_moe_*`` checkpoint over one split of its data, teacher-forced, in eval
mode and without gradients, and records every MoE layer's routing decision for every non-padding
token. It routes with the checkpoint's ``--moe-eval-gating``: top-1 by default, the paper's
evaluation, where every token takes one expert; ``overrides={"moe_eval_gating": "train"}``
(``--moe-eval-gating train``) shows the routing the model was trained with. Writes into ``--out``:

* ``summary.json``: per layer, the tokens routed, how many took 2+ experts, the expert load and
  the histogram of experts per token; the same per side (encoder, decoder) and overall; the
  tokens (words, after BPE merging) that most often take two experts, with counts.
* ``tokens.jsonl``: one record per (token, MoE layer): sentence id, position, token, layer, the
  experts used (best first) and the gate probabilities over all experts.
* ``two_expert_by_layer.png`` (paper Fig. 2), ``topk_profiles.png`` (Fig. 1: normalized top-k
  gate probabilities of the tokens of a few sampled sentences), ``expert_load.png`` (heatmap).
* ``report.md``, which links them all.

Positions and ids: fairseq sorts batches by length and left-pads the source. A layer's routing rows
are in the flattened (T, B) order of its input, so row ``r`` is time step ``r // B`` of batch
column ``r % B``; the column's sentence id is ``sample["id"][b]`` and the position is the number of
non-padding tokens before it (this holds for left and right padding alike). Encoder positions
index the source (its final ``</s>`` included). Decoder positions index the decoder input: position
0 is the ``</s>`` that starts decoding and position p holds target token p - 1; each decoder record
also names the ``target`` token predicted there.

Words: with ``--bpe-merge sentencepiece`` a piece starting with ``▁`` starts a word and the pieces
after it continue it (``subword_nmt``: a piece ending in ``@@`` continues into the next). A word
occurrence counts as two-expert in a layer when at least one of its pieces took 2+ experts there;
``--bpe-merge none`` reports the pieces themselves.

Layer labels in the plots are the metric suffixes of the training log (``enc0``, ``dec1``: the
criterion's :func:`~fairseq_adaptive_moe.criterions.moe_logging.short_name`).
"""

import json
import logging
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..criterions.moe_logging import short_name
from ..models.dense_to_moe import moe_layers

PROG = "adaptive-moe-routing"
OUTPUT_FILES = ("summary.json", "tokens.jsonl", "two_expert_by_layer.png", "topk_profiles.png",
                "expert_load.png", "report.md")
SPECIAL_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
SIDES = ("encoder", "decoder")



class InputError(Exception):
    """Bad input (checkpoint, data, split, options); the message names it. Raised before
    anything is written."""


@dataclass
class RoutingOptions:
    """One analysis (the flags of ``adaptive-moe-routing``, by the same names)."""

    data: str  # fairseq data-bin directory (dictionaries and binarized splits)
    path: str  # adaptive_moe_* checkpoint
    out: str  # output directory (created if missing)
    gen_subset: str = "valid"  # the split to analyse
    max_tokens: Optional[int] = None  # tokens per batch (4096 when neither this nor max_sentences)
    max_sentences: Optional[int] = None  # sentences per batch
    sample_tokens: int = 48  # about how many tokens per side the top-k profile plot shows
    top_tokens: int = 30  # how many of the most frequent two-expert tokens to list per side
    bpe_merge: str = "auto"  # sentencepiece, subword_nmt, none, or auto (from the dictionary)
    seed: int = 1  # seed of the sentence sample
    cpu: bool = False  # run on the CPU even if CUDA is available
    no_progress_bar: bool = False


BPE_MERGES = ("auto", "sentencepiece", "subword_nmt", "none")


def check_options(options: RoutingOptions) -> None:
    """Raise :class:`InputError` naming the first bad option (by its flag)."""
    for flag in ("max_tokens", "max_sentences"):
        value = getattr(options, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if options.sample_tokens < 1 or options.top_tokens < 1:
        raise InputError("--sample-tokens and --top-tokens must be >= 1")
    if options.bpe_merge not in BPE_MERGES:
        raise InputError(f"--bpe-merge must be one of {BPE_MERGES}, got {options.bpe_merge!r}")


# ---- loading -----------------------------------------------------------------------------------

def load(path: str, data: str, split: str, overrides: Optional[dict] = None):
    """(model, task, cfg, dataset): the checkpoint at ``path`` with ``data`` as its data path
    (``overrides``: model options to override, as fairseq-generate's ``--model-overrides``), and
    the split ``split``.

    Raises InputError for a missing or unloadable checkpoint, a model without MoE layers, or an
    unknown split. Nothing is written before this returns.
    """
    import fairseq_adaptive_moe  # noqa: F401  (registers the models; lets torch >= 2.6 load)
    from fairseq import checkpoint_utils

    from ..errors import AdaptiveMoEError

    if not os.path.isfile(path):
        raise InputError(f"checkpoint not found: {path}")
    if not os.path.isdir(data):
        raise InputError(f"data directory not found: {data}")
    try:
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [path], arg_overrides={**(overrides or {}), "data": data})
    except AdaptiveMoEError as e:  # a bad --model-overrides value: the MoE check names the flag
        raise InputError(str(e)) from None
    except Exception as e:  # noqa: BLE001  (torch, fairseq and omegaconf raise many kinds)
        raise InputError(f"cannot load {path}: {_first_line(e)}") from None
    model = models[0]
    if not moe_layers(model):
        arch = getattr(cfg.model, "arch", None) or getattr(cfg.model, "_name", "?")
        raise InputError(f"{path} has no MoE layers (arch {arch}); {PROG} needs an "
                         "adaptive_moe_* checkpoint")
    try:
        task.load_dataset(split)
    except Exception as e:  # noqa: BLE001  (fairseq raises FileNotFoundError or others)
        raise InputError(f"split {split!r} not found in {data}: {_first_line(e)}") from None
    return model, task, cfg, task.dataset(split)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def batch_iterator(task, model, dataset, max_tokens: Optional[int], max_sentences: Optional[int]):
    """fairseq's deterministic batches (sorted by length, no shuffling), as fairseq-validate."""
    from fairseq import utils

    if max_tokens is None and max_sentences is None:
        max_tokens = 4096
    return task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_sentences=max_sentences,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True, seed=1,
    ).next_epoch_itr(shuffle=False)


# ---- words -------------------------------------------------------------------------------------

def detect_bpe(dictionary) -> str:
    """How the dictionary's pieces join into words: sentencepiece, subword_nmt or none."""
    symbols = dictionary.symbols
    if any(s.startswith("\u2581") for s in symbols):
        return "sentencepiece"
    if any(s.endswith("@@") for s in symbols):
        return "subword_nmt"
    return "none"


def group_words(pieces: Sequence[str], bpe: str) -> Tuple[List[int], List[str]]:
    """(word index of each piece, word strings). Special symbols are words of their own."""
    word_of, words, parts = [], [], []
    joins_next = False
    for piece in pieces:
        special = piece in SPECIAL_SYMBOLS
        if bpe == "sentencepiece":
            new = special or piece.startswith("\u2581") or not words or words[-1] is not None
        elif bpe == "subword_nmt":
            new = special or not joins_next or not words
            joins_next = piece.endswith("@@") and not special
        else:
            new = True
        if new:
            words.append(None)  # filled when the word is complete
            parts.append([])
        parts[-1].append(piece)
        word_of.append(len(words) - 1)
        if special:  # a special symbol never continues
            words[-1] = piece
            joins_next = False
    text = []
    for ws, ps in zip(words, parts):
        if ws is not None:
            text.append(ws)
        elif bpe == "sentencepiece":
            text.append("".join(ps).replace("\u2581", "") or "\u2581")
        elif bpe == "subword_nmt":
            text.append("".join(p[:-2] if p.endswith("@@") else p for p in ps))
        else:
            text.append(ps[0])
    return word_of, text


# ---- collection --------------------------------------------------------------------------------

@dataclass
class LayerTally:
    """Counts for one MoE layer over the whole split."""

    name: str
    num_experts: int
    max_slots: int
    tokens: int = 0  # non-padding tokens routed
    multi: int = 0  # tokens that used 2+ experts
    no_expert: int = 0  # non-padding tokens that kept no expert (dropped by a capacity limit)
    load: np.ndarray = None  # (E,) slots per expert
    hist: np.ndarray = None  # (K+1,) tokens by number of experts used

    def __post_init__(self):
        self.load = np.zeros(self.num_experts, dtype=np.int64)
        self.hist = np.zeros(self.max_slots + 1, dtype=np.int64)

    @property
    def side(self) -> str:
        return self.name.split(".")[0]

    def as_dict(self) -> dict:
        slots = int(self.load.sum())
        mean = slots / max(self.load.size, 1)
        share = (self.load / slots).round(6).tolist() if slots else [0.0] * self.load.size
        return dict(
            name=self.name, side=self.side, tokens=self.tokens, two_expert_tokens=self.multi,
            two_expert_fraction=self.multi / self.tokens if self.tokens else 0.0,
            experts_per_token=slots / self.tokens if self.tokens else 0.0,
            no_expert_tokens=self.no_expert,
            experts_per_token_histogram=self.hist.tolist(),
            expert_load=self.load.tolist(),
            expert_load_share=share,
            load_imbalance=float(self.load.max() / mean) if slots else 0.0,
        )


@dataclass
class Collector:
    """Walks the batches, tallies every layer, writes token records, keeps the sampled profiles."""

    src_dict: object
    tgt_dict: object
    bpe: str
    sample_ids: set
    records_fh: object = None
    layers: Dict[str, LayerTally] = field(default_factory=dict)
    # side -> word -> [two-expert (occurrence, layer) pairs, all (occurrence, layer) pairs]
    words: Dict[str, Dict[str, List[int]]] = field(
        default_factory=lambda: {s: defaultdict(lambda: [0, 0]) for s in SIDES})
    # (layer name, sentence id) -> (pieces, normalized top-k probs (T, k), experts used (T,))
    profiles: Dict[Tuple[str, int], tuple] = field(default_factory=dict)
    sample_order: List[int] = field(default_factory=list)  # the sampled ids, in plot order
    sentences: int = 0
    records: int = 0

    def side_tokens(self, sample, side: str):
        """(B, T) tokens the ``side`` layers saw, their dictionary, and the targets (decoder)."""
        net_input = sample["net_input"]
        if side == "encoder":
            return net_input["src_tokens"], self.src_dict, None
        if "prev_output_tokens" in net_input:  # encoder-decoder
            return net_input["prev_output_tokens"], self.tgt_dict, sample.get("target")
        return net_input["src_tokens"], self.tgt_dict, sample.get("target")  # decoder-only LM

    def add_batch(self, sample, moe_stats) -> None:
        ids = sample["id"].tolist()
        self.sentences += len(ids)
        records = []
        per_side = {}
        for index, stats in enumerate(moe_stats):
            side = stats.name.split(".")[0]
            if side not in per_side:
                per_side[side] = self.side_view(sample, side)
            view = per_side[side]
            records += self.add_layer(stats, index, view, ids)
        if self.records_fh is not None:
            records.sort(key=lambda r: r[0])
            for _, line in records:
                self.records_fh.write(line)
                self.records_fh.write("\n")
            self.records += len(records)

    def side_view(self, sample, side: str) -> dict:
        tokens, dictionary, target = self.side_tokens(sample, side)
        tokens_tb = tokens.t().cpu()  # (T, B), the layout of the layer's rows
        mask = tokens_tb.ne(dictionary.pad())
        rows = mask.reshape(-1).nonzero().squeeze(1)  # non-padding rows in (T, B) order
        batch = tokens_tb.shape[1]
        position = (mask.long().cumsum(0) - 1).reshape(-1)[rows]
        column = rows % batch
        token_ids = tokens_tb.reshape(-1)[rows].tolist()
        pieces = [dictionary[t] for t in token_ids]
        targets = None
        if target is not None and target.shape == tokens.shape:
            targets = [dictionary[t] for t in target.t().cpu().reshape(-1)[rows].tolist()]
        # words, per sentence column: the pieces in position order
        by_column = defaultdict(list)
        for k, (c, pos) in enumerate(zip(column.tolist(), position.tolist())):
            by_column[c].append((pos, k))
        word_key = [None] * len(token_ids)  # row k -> (column, word index)
        word_text = {}
        for c, items in by_column.items():
            items.sort()
            word_of, text = group_words([pieces[k] for _, k in items], self.bpe)
            for (_, k), w in zip(items, word_of):
                word_key[k] = (c, w)
            for w, t in enumerate(text):
                word_text[(c, w)] = t
        return dict(side=side, shape=tuple(tokens_tb.shape), rows=rows, position=position.tolist(),
                    column=column.tolist(), pieces=pieces, targets=targets, word_key=word_key,
                    word_text=word_text)

    def add_layer(self, stats, index: int, view: dict, ids: List[int]) -> List[tuple]:
        decision = stats.routing
        if tuple(stats.experts_per_token.shape) != view["shape"]:
            raise RuntimeError(f"layer {stats.name}: routed shape "
                               f"{tuple(stats.experts_per_token.shape)} does not match its input "
                               f"tokens {view['shape']}")
        rows = view["rows"]
        used = decision.used.cpu()[rows]  # (N, K)
        expert_index = decision.expert_index.cpu()[rows]
        probs = decision.probs.float().cpu()[rows]  # (N, E)
        count = used.sum(1)  # (N,)
        if stats.experts_per_token.cpu().reshape(-1)[rows].ne(count).any():
            raise RuntimeError(f"layer {stats.name}: experts per token disagree with the routing")
        num_experts = probs.shape[1]
        tally = self.layers.get(stats.name)
        if tally is None:
            tally = self.layers[stats.name] = LayerTally(stats.name, num_experts, used.shape[1])
        tally.tokens += rows.numel()
        tally.multi += int(count.ge(2).sum())
        tally.no_expert += int(count.eq(0).sum())
        tally.load += torch.bincount(expert_index[used], minlength=num_experts).numpy()
        tally.hist += torch.bincount(count, minlength=tally.hist.size).numpy()[:tally.hist.size]

        # words: an occurrence is two-expert in this layer if any of its pieces is
        multi_word = {}
        for key, n in zip(view["word_key"], count.tolist()):
            multi_word[key] = multi_word.get(key, False) or n >= 2
        counts = self.words[view["side"]]
        for key, two in multi_word.items():
            entry = counts[view["word_text"][key]]
            entry[0] += int(two)
            entry[1] += 1

        # Figure 1 profiles: normalized top-k probabilities of the sampled sentences
        k = max(2, used.shape[1])
        top = probs.topk(min(k, num_experts), dim=1).values
        top = top / top.sum(1, keepdim=True)
        columns = view["column"]
        for c in {c for c in columns if ids[c] in self.sample_ids}:
            sel = [j for j, cc in enumerate(columns) if cc == c]
            sel.sort(key=lambda j: view["position"][j])
            self.profiles[(stats.name, ids[c])] = (
                [view["pieces"][j] for j in sel], top[sel].numpy(), count[sel].numpy())

        if self.records_fh is None:
            return []
        out = []
        experts = [[e for e, u in zip(ei, us) if u]
                   for ei, us in zip(expert_index.tolist(), used.tolist())]
        probs_list = probs.double().numpy().round(5).tolist()
        for j, (c, pos) in enumerate(zip(columns, view["position"])):
            rec = {"id": ids[c], "layer": stats.name, "pos": pos, "token": view["pieces"][j],
                   "experts": experts[j], "probs": probs_list[j]}
            if view["targets"] is not None and view["side"] == "decoder":
                rec["target"] = view["targets"][j]
            out.append(((ids[c], index, pos), json.dumps(rec, ensure_ascii=False)))
        return out


def sample_sentences(dataset, budget: int, seed: int) -> List[int]:
    """Ids of random sentences (seeded) whose source lengths add up to about ``budget`` tokens."""
    sizes = np.asarray(dataset.src_sizes if hasattr(dataset, "src_sizes") else dataset.sizes)
    order = np.random.RandomState(seed).permutation(len(sizes))
    chosen, total = [], 0
    for i in order:
        if chosen and total + int(sizes[i]) > budget:
            if total >= budget * 0.6:
                break
            continue
        chosen.append(int(i))
        total += int(sizes[i])
    return chosen


def run(model, task, dataset, options: RoutingOptions,
        out_dir: Optional[Path]) -> Tuple[Collector, dict]:
    """Forward passes over the split (teacher-forced, eval mode, no gradients), writing
    ``out_dir``/tokens.jsonl if given; returns the collector and the gating actually used."""
    from fairseq import utils
    from tqdm import tqdm

    use_cuda = torch.cuda.is_available() and not options.cpu
    if use_cuda:
        model.cuda()
    model.eval()
    gate = moe_layers(model)[0][1].gate
    gating = dict(policy=gate.active_policy(), train_gating=gate.policy,
                  eval_gating=gate.eval_policy, threshold=gate.current_threshold(),
                  max_experts=gate.max_experts, threshold_probs=gate.threshold_probs,
                  combine_weights=gate.combine_weights, capacity_factor=gate.capacity_factor,
                  num_experts=gate.num_experts)
    bpe = options.bpe_merge if options.bpe_merge != "auto" else detect_bpe(task.source_dictionary)
    sampled = sample_sentences(dataset, options.sample_tokens, options.seed)
    itr = batch_iterator(task, model, dataset, options.max_tokens, options.max_sentences)
    fh = open(out_dir / "tokens.jsonl", "w", encoding="utf-8") if out_dir is not None else None
    collector = Collector(task.source_dictionary, task.target_dictionary, bpe, set(sampled), fh,
                          sample_order=sampled)
    try:
        bar = tqdm(itr, total=len(itr), desc=f"{PROG} {options.gen_subset}", unit="batch",
                   disable=options.no_progress_bar, file=sys.stderr, mininterval=1.0)
        with torch.no_grad():
            for sample in bar:
                if not sample:
                    continue
                if use_cuda:
                    sample = utils.move_to_cuda(sample)
                _, extra = model(**sample["net_input"])
                collector.add_batch(sample, extra["moe_stats"])
    finally:
        if fh is not None:
            fh.close()
    return collector, gating


# ---- summary -----------------------------------------------------------------------------------

def top_words(counts: Dict[str, List[int]], n: int) -> List[dict]:
    """The ``n`` words most often two-expert (then by rate, then alphabetically)."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1][0], -kv[1][0] / kv[1][1], kv[0]))
    return [dict(token=w, two_expert=two, occurrences=occ, rate=round(two / occ, 4))
            for w, (two, occ) in ranked[:n] if two > 0]


def summarize(collector: Collector, gating: dict, options: RoutingOptions, dataset_size: int) -> dict:
    """The contents of summary.json (without ``command``)."""
    layers = [t.as_dict() for t in collector.layers.values()]

    def total(entries):
        tokens = sum(e["tokens"] for e in entries)
        multi = sum(e["two_expert_tokens"] for e in entries)
        return dict(tokens=tokens, two_expert_tokens=multi,
                    two_expert_fraction=multi / tokens if tokens else 0.0)

    sides = {s: total([e for e in layers if e["side"] == s]) for s in SIDES
             if any(e["side"] == s for e in layers)}
    return dict(
        checkpoint=str(options.path), data=str(options.data), split=options.gen_subset,
        sentences=collector.sentences, sentences_in_split=dataset_size,
        gating=gating, bpe_merge=collector.bpe,
        word_rule="a word occurrence is two-expert in a layer if any of its pieces took 2+ experts",
        layers=layers, sides=sides, overall=total(layers),
        top_tokens={s: top_words(collector.words[s], options.top_tokens) for s in sides},
        token_records=collector.records,
        sampled_sentences=collector.sample_order,
    )


# ---- plots -------------------------------------------------------------------------------------

def _pyplot():
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq sets the root to DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_two_expert(summary: dict, path: Path) -> None:
    """Paper Fig. 2: the share of tokens with 2+ experts, per layer."""
    plt = _pyplot()
    layers = summary["layers"]
    names = [short_name(e["name"]) for e in layers]
    values = [100 * e["two_expert_fraction"] for e in layers]
    colors = ["C0" if e["side"] == "encoder" else "C1" for e in layers]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.6 * len(layers) + 2), 3.4))
    bars = ax.bar(names, values, color=colors)
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                    fontsize=8)
    from matplotlib.patches import Patch

    sides = summary["sides"]
    handles = [Patch(color=color, label=f"{side} ({100 * sides[side]['two_expert_fraction']:.1f}%)")
               for side, color in (("encoder", "C0"), ("decoder", "C1")) if side in sides]
    ax.set_ylabel("tokens with 2+ experts (%)")
    ax.set_ylim(0, max(values + [1.0]) * 1.3 + 2)  # room for the labels and the legend
    g = summary["gating"]
    ax.set_title(f"{summary['split']}: {g['policy']} gating, T={g['threshold']}", fontsize=10)
    ax.legend(handles=handles, fontsize=8, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_expert_load(summary: dict, path: Path) -> None:
    """Heatmap of each layer's share of slots per expert."""
    plt = _pyplot()
    layers = summary["layers"]
    share = np.array([e["expert_load_share"] for e in layers]) * 100
    num_experts = share.shape[1]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * num_experts + 2.5), 0.45 * len(layers) + 1.6))
    im = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([f"{short_name(e['name'])} ({e['load_imbalance']:.2f}x)" for e in layers],
                       fontsize=8)
    ax.set_xticks(range(num_experts))
    ax.set_xlabel("expert")
    if num_experts <= 16:
        for i in range(share.shape[0]):
            for j in range(num_experts):
                ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="w" if share[i, j] < share.max() * 0.6 else "k")
    fig.colorbar(im, ax=ax, label="share of the layer's slots (%)")
    ax.set_title("expert load (layer label: max / mean load)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_topk_profiles(collector: Collector, summary: dict, path: Path) -> None:
    """Paper Fig. 1: for the tokens of a few sampled sentences, their top-k gate probabilities
    renormalized to sum to 1; tokens that took 2+ experts are marked."""
    plt = _pyplot()
    names = [e["name"] for e in summary["layers"]]
    panels = []
    for name in names:
        pieces, probs, counts = [], [], []
        for sid in collector.sample_order:
            entry = collector.profiles.get((name, sid))
            if entry is None:
                continue
            if pieces:  # a gap between sentences
                pieces.append("|")
                probs.append(np.full_like(entry[1][0], np.nan))
                counts.append(0)
            pieces += entry[0]
            probs += list(entry[1])
            counts += list(entry[2])
        if pieces:
            panels.append((name, pieces, np.array(probs), np.array(counts)))
    width = max(6.0, 0.2 * max((len(p[1]) for p in panels), default=10) + 1.5)
    fig, axes = plt.subplots(max(len(panels), 1), 1, figsize=(width, 1.9 * max(len(panels), 1) + 0.6),
                             squeeze=False)
    for ax, (name, pieces, probs, counts) in zip(axes[:, 0], panels):
        x = np.arange(len(pieces))
        bottom = np.zeros(len(pieces))
        for j in range(probs.shape[1]):
            col = np.nan_to_num(probs[:, j])
            ax.bar(x, col, bottom=bottom, width=0.8, color=f"C{j}",
                   label=f"top-{j + 1}" if ax is axes[0, 0] else None)
            bottom += col
        two = counts >= 2
        ax.scatter(x[two], np.full(two.sum(), 1.06), marker="v", color="red", s=12,
                   label="2+ experts" if ax is axes[0, 0] else None, clip_on=False)
        ax.set_ylim(0, 1.12)
        ax.set_xlim(-0.6, len(pieces) - 0.4)
        ax.set_xticks(x)
        ax.set_xticklabels(pieces, rotation=90, fontsize=7)
        ax.set_ylabel(short_name(name), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    k = panels[0][2].shape[1] if panels else 2
    fig.suptitle(f"normalized top-{k} gate probabilities of sampled tokens "
                 f"({summary['gating']['policy']} gating, T={summary['gating']['threshold']})",
                 fontsize=10, x=0.01, ha="left")
    if panels:
        fig.legend(loc="upper right", fontsize=7, ncol=k + 1, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- report ------------------------------------------------------------------------------------

def write_report(summary: dict, path: Path, command: str) -> None:
    """report.md: the numbers of the summary with the plots, linked."""
    g = summary["gating"]
    unit = "pieces" if summary["bpe_merge"] == "none" else f"words ({summary['bpe_merge']} merged)"
    lines = [
        f"# Routing report: `{summary['split']}` split",
        "",
        f"- checkpoint: `{summary['checkpoint']}`",
        f"- data: `{summary['data']}`, {summary['sentences']} of {summary['sentences_in_split']} "
        "sentences (teacher-forced, eval mode)",
        f"- gating in this run: **{g['policy']}** (trained with {g['train_gating']}, eval gating "
        f"`{g['eval_gating']}`), T = {g['threshold']}, K = {g['max_experts']}, "
        f"{g['num_experts']} experts, threshold probs {g['threshold_probs']}, "
        f"capacity factor {g['capacity_factor']}",
        f"- command: `{command}`",
        *([f"- top-1 gating (the paper's evaluation): every token takes one expert; "
           "`--moe-eval-gating train` shows the routing the model was trained with"]
          if g["policy"] == "top1" and g["train_gating"] != "top1" else []),
        "",
        "## Tokens with 2+ experts per layer",
        "",
        "![two-expert share by layer](two_expert_by_layer.png)",
        "",
        "| layer | tokens | 2+ experts | share | experts/token | load max/mean |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in summary["layers"]:
        lines.append(f"| {e['name']} | {e['tokens']} | {e['two_expert_tokens']} | "
                     f"{100 * e['two_expert_fraction']:.1f}% | {e['experts_per_token']:.3f} | "
                     f"{e['load_imbalance']:.2f} |")
    for side, s in summary["sides"].items():
        lines.append(f"| **{side}** | {s['tokens']} | {s['two_expert_tokens']} | "
                     f"**{100 * s['two_expert_fraction']:.1f}%** | | |")
    o = summary["overall"]
    lines += [f"| **all** | {o['tokens']} | {o['two_expert_tokens']} | "
              f"**{100 * o['two_expert_fraction']:.1f}%** | | |", ""]
    if any(e["no_expert_tokens"] for e in summary["layers"]):
        lines += ["Some tokens kept no expert (capacity limit): see `no_expert_tokens` in "
                  "summary.json.", ""]
    lines += [
        "## Normalized top-k gate probabilities of sampled tokens (paper Figure 1)",
        "",
        f"Sentences {summary['sampled_sentences']} (ids), every MoE layer. Each bar is one token's "
        "top-k gate probabilities renormalized to sum to 1; a red mark means the token took 2+ "
        "experts." + (" Decoder panels show the decoder input (it starts with `</s>`)."
                      if "encoder" in summary["sides"] else ""),
        "",
        "![top-k profiles](topk_profiles.png)",
        "",
        "## Expert load",
        "",
        "![expert load](expert_load.png)",
        "",
        "## Tokens that most often take two experts",
        "",
        f"Unit: {unit}; counted once per occurrence and MoE layer of the side: {summary['word_rule']}.",
        "",
    ]
    for side, rows in summary["top_tokens"].items():
        lines += [f"### {side}", "", "| token | 2+ experts | occurrences x layers | rate |",
                  "|---|---:|---:|---:|"]
        for r in rows:
            token = r["token"].replace("|", "\\|")
            lines.append(f"| `{token}` | {r['two_expert']} | {r['occurrences']} | "
                         f"{100 * r['rate']:.0f}% |")
        lines.append("")
    lines += [
        "## Files",
        "",
        "- [summary.json](summary.json): the numbers above, per layer and side",
        f"- [tokens.jsonl](tokens.jsonl): {summary['token_records']} records, one per token and "
        "MoE layer: `id`, `layer`, `pos`, `token`, `experts` (used, best first), `probs` (gate "
        "softmax over all experts); decoder records add `target`",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


# ---- the whole analysis ------------------------------------------------------------------------

def analyse(options: RoutingOptions, overrides: Optional[dict] = None, command: str = "") -> dict:
    """Load, run over the split and write every file of :data:`OUTPUT_FILES` into
    ``options.out``; returns the summary (summary.json, with ``command``).

    ``overrides``: model options to override (e.g. ``{"moe_eval_gating": "top1"}``). Raises
    :class:`InputError` before anything is written.
    """
    check_options(options)
    model, task, _, dataset = load(options.path, options.data, options.gen_subset, overrides)
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out exists and is not a directory: {out}")
    out.mkdir(parents=True, exist_ok=True)
    collector, gating = run(model, task, dataset, options, out)
    summary = summarize(collector, gating, options, len(dataset))
    summary["command"] = command
    with open(out / "summary.json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1, ensure_ascii=False)
    plot_two_expert(summary, out / "two_expert_by_layer.png")
    plot_topk_profiles(collector, summary, out / "topk_profiles.png")
    plot_expert_load(summary, out / "expert_load.png")
    write_report(summary, out / "report.md", command)
    return summary
