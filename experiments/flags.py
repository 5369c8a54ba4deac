"""The fairseq-train (and fairseq-generate) flags that the runners share, in one place.

Every runner trains its schemes with the same recipe and changes only the gating
(:func:`scheme_flags`), so that their times and scores compare:

- :func:`translation_recipe`: the translation model, criterion and optimiser (``compare``,
  ``throughput``, ``curriculum_table6``, ``a2a_bytes``); ``examples/translation/train.sh`` and
  ``demo.sh`` write the same flags out for a user to read (``tests/test_translation_recipe.py``
  checks that they agree);
- :func:`validation_flags`, :func:`device_flags`, :func:`log_flags`: schedule, device and logging;
- :func:`bart_summarization_flags` and :func:`bart_generate_flags`: fairseq's BART CNN/DailyMail
  recipe, used by ``examples/summarization/recipe.py`` and by ``compare`` on a summarization data-bin.

Each function returns a list of ``fairseq-train`` arguments (program name excluded), in the
order the runners have always written them, so that a run recorded with its command is recognised.
"""

from typing import Optional, Sequence

from . import ROOT

USER_DIR = ROOT / "fairseq_adaptive_moe"
SCHEMES = ("dense", "top1", "top2", "adaptive")
CRITERION = "adaptive_moe_label_smoothed_cross_entropy"
# fairseq examples/bart/README.summarization.md, CNN/DM generation
BART_GENERATION = {"beam": 4, "lenpen": 2.0, "max_len_b": 140, "min_len": 55,
                   "no_repeat_ngram_size": 3}
BART_GATINGS = ("train", "top1", "top2", "adaptive")


def scheme_flags(scheme: str, threshold: float) -> list:
    """The flags that select a gating scheme; every other flag is shared. ValueError for an
    unknown scheme.

    - ``dense``: ``--moe-freq 0`` (no MoE layer, same code path);
    - ``top1`` / ``top2``: ``--moe-gating top1`` / ``top2``;
    - ``adaptive``: ``--moe-gating adaptive --moe-threshold T``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    if scheme == "dense":
        return ["--moe-freq", "0"]
    flags = ["--moe-gating", scheme]
    return flags + (["--moe-threshold", f"{threshold:g}"] if scheme == "adaptive" else [])


def translation_recipe(data_bin, arch: str, lr, warmup_updates: int, task: str = "translation",
                       dropout: Optional[str] = "0.1", weight_decay: Optional[str] = "0.0001") -> list:
    """The translation recipe: shared embeddings, label smoothing 0.1, Adam (0.9, 0.98) with the
    inverse square-root schedule, dropout 0.1 and weight decay 1e-4 (None leaves either to the
    arch / fairseq default)."""
    flags = [
        str(data_bin), "--user-dir", str(USER_DIR), "--task", task,
        "--arch", arch, "--share-all-embeddings",
        "--criterion", CRITERION, "--label-smoothing", "0.1",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(warmup_updates),
    ]
    if dropout is not None:
        flags += ["--dropout", dropout]
    if weight_decay is not None:
        flags += ["--weight-decay", weight_decay]
    return flags


def validation_flags(every_updates: int, never: int = 1000000) -> list:
    """Validate every ``every_updates`` updates; the epoch-end validation and saving (every
    ``never`` epochs) are pushed out of reach, so that every run validates at the same updates."""
    return ["--validate-interval-updates", str(every_updates),
            "--validate-interval", str(never), "--save-interval", str(never)]


def device_flags(gpu: bool) -> list:
    """``--fp16`` on a GPU, ``--cpu`` (fp32) otherwise."""
    return ["--fp16"] if gpu else ["--cpu"]


def log_flags(interval: int = 10) -> list:
    """fairseq's json log lines (the runners read ``train_inner``, ``train`` and ``valid``)."""
    return ["--log-format", "json", "--log-interval", str(interval), "--no-progress-bar"]


def bart_summarization_flags(data_bin, save_dir, scheme: str, threshold: float = 0.1,
                             arch: str = "adaptive_moe_bart_tiny", max_update: int = 400,
                             max_tokens: int = 4096, lr: float = 3e-5,
                             warmup_updates: Optional[int] = None,
                             max_source_positions: Optional[int] = None, seed: int = 1,
                             restore_file=None, cpu: bool = False,
                             validate_interval_updates: Optional[int] = None,
                             log_interval: int = 10, extra: Sequence[str] = ()) -> list:
    """fairseq's BART summarization fine-tuning flags (``examples/bart/README.summarization.md``:
    label smoothing 0.1, ``--truncate-source``, ``--layernorm-embedding``, shared embeddings,
    dropout and attention dropout 0.1, weight decay 0.01, Adam (0.9, 0.999) eps 1e-8, clip-norm
    0.1, polynomial decay with ``min(500, max_update / 10)`` warm-up by default,
    ``--required-batch-size-multiple 1``) with one scheme. ``restore_file``: a dense BART
    checkpoint whose FFNs become the experts; optimizer, data loader and meters are reset."""
    warmup = warmup_updates if warmup_updates is not None else max(1, min(500, max_update // 10))
    flags = [
        str(data_bin), "--user-dir", str(USER_DIR), "--task", "translation",
        "--source-lang", "source", "--target-lang", "target", "--truncate-source",
        "--arch", arch, "--layernorm-embedding", "--share-all-embeddings",
        "--share-decoder-input-output-embed", "--required-batch-size-multiple", "1",
        "--criterion", CRITERION, "--label-smoothing", "0.1",
        "--dropout", "0.1", "--attention-dropout", "0.1", "--weight-decay", "0.01",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.999)", "--adam-eps", "1e-08",
        "--clip-norm", "0.1", "--lr-scheduler", "polynomial_decay", "--lr", f"{lr:g}",
        "--total-num-update", str(max_update), "--warmup-updates", str(warmup),
        "--max-update", str(max_update), "--max-tokens", str(max_tokens),
        "--skip-invalid-size-inputs-valid-test", "--seed", str(seed),
        "--save-dir", str(save_dir), "--no-epoch-checkpoints",
    ] + log_flags(log_interval)
    if max_source_positions is not None:
        flags += ["--max-source-positions", str(max_source_positions)]
    if validate_interval_updates is not None:
        flags += validation_flags(validate_interval_updates)
    if restore_file is not None:
        flags += ["--restore-file", str(restore_file), "--reset-optimizer", "--reset-dataloader",
                  "--reset-meters"]
    if cpu:
        flags.append("--cpu")
    return flags + scheme_flags(scheme, threshold) + list(extra)


def bart_generate_flags(data_bin, checkpoint, gating: str = "train", subset: str = "test",
                        record: Optional[dict] = None, cpu: bool = False, max_tokens: int = 8000,
                        **overrides) -> list:
    """fairseq-generate's arguments with BART's CNN/DM settings (:data:`BART_GENERATION`;
    ``overrides`` change them), the BPE of the data-bin's ``prepare.json`` ``record`` and
    ``--model-overrides`` to ``gating`` (``train`` too). ValueError for an unknown one."""
    if gating not in BART_GATINGS:
        raise ValueError(f"unknown gating {gating!r} (choose from {', '.join(BART_GATINGS)})")
    settings = {**BART_GENERATION, **overrides}
    args = [str(data_bin), "--user-dir", str(USER_DIR), "--task", "translation",
            "--source-lang", "source", "--target-lang", "target", "--truncate-source",
            "--path", str(checkpoint), "--gen-subset", subset, "--max-tokens", str(max_tokens),
            "--skip-invalid-size-inputs-valid-test",
            # fairseq's batch_by_size drops the last few sentences when the batch size multiple
            # is 8 (its default): 12 test articles gave 8 outputs
            "--required-batch-size-multiple", "1"]
    for key, value in settings.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    record = record or {}
    if record.get("args", {}).get("bpe") == "gpt2":
        encoder_json, vocab_bpe, _ = record["args"]["gpt2_files"]
        args += ["--bpe", "gpt2", "--gpt2-encoder-json", encoder_json, "--gpt2-vocab-bpe", vocab_bpe]
    else:
        args += ["--post-process", "sentencepiece"]
    # named even for "train": the checkpoint's own --moe-eval-gating default may be top1
    args += ["--model-overrides", repr({"moe_eval_gating": gating})]
    return args + (["--cpu"] if cpu else [])

