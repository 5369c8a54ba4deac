"""examples/summarization: prepare (sentencepiece and GPT-2 BPE), the BART recipe end to end with
ROUGE, and experiments.compare in summarization mode, on the first lines of cnndm-small (CPU)."""

import json
import statistics

import pytest

from conftest import load_script, shared_data
from experiments import compare
from test_bart import prepare_cnndm, train_log_records

pytestmark = pytest.mark.slow

recipe = load_script("examples/summarization/recipe.py")
score = load_script("examples/summarization/score.py")
prepare = load_script("examples/summarization/prepare.py")

SMALL_EVAL = ["--beam", "2", "--max-len-b", "12", "--min-len", "3"]


@pytest.fixture(scope="module")
def cnndm_bin(tmp_path_factory):
    return prepare_cnndm(tmp_path_factory, train=150, evals=12)


@pytest.fixture(scope="module")
def recipe_run(cnndm_bin, tmp_path_factory):
    base = tmp_path_factory.mktemp("recipe")
    rc = recipe.main(["train", str(cnndm_bin), str(base / "ck"), "--scheme", "adaptive",
                      "--max-update", "3", "--lr", "1e-3", "--max-tokens", "2048", "--cpu",
                      "--", "--disable-validation", "--log-interval", "1"])
    assert rc == 0
    rc = recipe.main(["evaluate", str(cnndm_bin), str(base / "ck" / "checkpoint_last.pt"),
                      str(base / "eval"), "--cpu", *SMALL_EVAL])
    assert rc == 0
    return base


def test_prepare_output(cnndm_bin):
    record = json.loads((cnndm_bin / "prepare.json").read_text())
    assert record["lines"] == {"train": 150, "valid": 12, "test": 12}
    assert record["truncated_lines"]["train.source"] > 100  # most articles are over 120 pieces
    for split in ("train", "valid", "test"):
        for line in (cnndm_bin / "bpe" / f"{split}.source").read_text().splitlines():
            assert len(line.split(" ")) <= 120
    raw = (cnndm_bin / "raw" / "test.target").read_text().splitlines()
    assert raw == (shared_data("cnndm-small") / "test.target").read_text().splitlines()[:12]


def test_recipe_trains_a_tiny_moe_bart_and_scores_rouge(recipe_run, cnndm_bin):
    import torch

    state = torch.load(recipe_run / "ck" / "checkpoint_last.pt", map_location="cpu")
    model_cfg = state["cfg"]["model"]
    assert model_cfg.arch == "adaptive_moe_bart_tiny" and model_cfg.moe_gating == "adaptive"
    assert state["model"]["decoder.layers.1.moe.experts.fc1_weight"].shape == (4, 128, 512)
    assert state["optimizer_history"][-1]["num_updates"] == 3
    ev = recipe_run / "eval"
    refs = (cnndm_bin / "raw" / "test.target").read_text().splitlines()
    for gating in ("train", "top1"):
        hyps = score.read_hypotheses(ev / f"gen-{gating}.txt")
        assert sorted(hyps) == list(range(len(refs)))
        assert all(h.strip() for h in hyps.values())  # --min-len 3 pieces
        result = json.loads((ev / f"rouge-{gating}.json").read_text())
        assert result["articles"] == 12 and result["missing"] == 0
        for metric in score.METRICS:
            assert 0 <= result["interval95"][metric]["low"] <= result[metric] \
                <= result["interval95"][metric]["high"] <= 100
        # the bootstrap's mid value is close to the plain mean of rouge-score's per-article F1
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
        mean = statistics.mean(scorer.score(refs[i], hyps[i])["rouge1"].fmeasure for i in hyps)
        assert abs(100 * mean - result["rouge1"]) < 1.5
    md = (ev / "rouge.md").read_text()
    assert "| train |" in md and "| top1 |" in md and "beam 2" in md
    assert md.index("| top1 |") < md.index("| train |")  # the paper's protocol first
    for gating in ("top1", "train"):  # each override reached fairseq, "as trained" included
        assert f"'moe_eval_gating': '{gating}'" in (ev / f"gen-{gating}.txt").read_text()


def test_score_cli_and_bad_input(recipe_run, cnndm_bin, tmp_path, capsys):
    gen, ref = recipe_run / "eval" / "gen-train.txt", cnndm_bin / "raw" / "test.target"
    assert score.main([str(gen), str(ref)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("ROUGE-1 ") and "ROUGE-2" in line and "ROUGE-Lsum" in line
    empty = tmp_path / "empty.txt"
    empty.write_text("S-0\tno hypotheses here\n")
    for argv, message in (([str(tmp_path / "nope.txt"), str(ref)], "cannot read"),
                          ([str(empty), str(ref)], "no D- lines")):
        assert score.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("argv, message", [
    (["train", "{nope}", "{tmp}/ck"], "no summarization data-bin"),
    (["train", "{bin}", "{tmp}/ck", "--restore-file", "{tmp}/none.pt"], "--restore-file not found"),
    (["evaluate", "{bin}", "{tmp}/none.pt", "{tmp}/ev"], "checkpoint not found"),
    (["evaluate", "{bin}", "{bin}/prepare.json", "{tmp}/ev", "--gatings", "top3"], "bad --gatings"),
])
def test_recipe_bad_input(cnndm_bin, tmp_path, capsys, argv, message):
    argv = [a.format(bin=cnndm_bin, tmp=tmp_path, nope=tmp_path / "nope") for a in argv]
    assert recipe.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "ck").exists() and not (tmp_path / "ev").exists()


def test_train_flags_are_the_bart_recipe_and_differ_only_in_gating(tmp_path):
    flags = {s: recipe.train_flags("DATA", "SAVE", s, 0.2) for s in recipe.SCHEMES}
    common = set(flags["dense"]) - {"--moe-freq", "0"}
    for scheme, f in flags.items():
        assert common <= set(f)
    for flag in ("--truncate-source", "--layernorm-embedding", "--share-all-embeddings",
                 "--share-decoder-input-output-embed"):
        assert flag in common
    assert flags["adaptive"][-4:] == ["--moe-gating", "adaptive", "--moe-threshold", "0.2"]
    assert flags["dense"][-2:] == ["--moe-freq", "0"]
    f = flags["top2"]
    assert f[f.index("--label-smoothing") + 1] == "0.1" and f[f.index("--clip-norm") + 1] == "0.1"
    gen = recipe.generate_args("DATA", "CKPT", "top1")
    pairs = dict(zip(gen, gen[1:]))
    assert (pairs["--beam"], pairs["--lenpen"], pairs["--max-len-b"], pairs["--min-len"],
            pairs["--no-repeat-ngram-size"]) == ("4", "2.0", "140", "55", "3")
    assert pairs["--model-overrides"] == "{'moe_eval_gating': 'top1'}"
    gen = recipe.generate_args("DATA", "CKPT", "train")  # as trained: explicit, not the saved default
    assert gen.count("--model-overrides") == 1
    assert gen[gen.index("--model-overrides") + 1] == "{'moe_eval_gating': 'train'}"
    restored = recipe.train_flags("DATA", "SAVE", "top1", restore_file="bart.large/model.pt")
    assert {"--restore-file", "--reset-optimizer", "--reset-dataloader"} <= set(restored)


# ---- GPT-2 BPE (BART's own) ---------------------------------------------------------------------

def write_gpt2_files(folder):
    """A byte-level GPT-2 BPE in fairseq's file formats: every byte, two merges."""
    from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode

    symbols = list(bytes_to_unicode().values()) + ["\u0120t", "\u0120th"]
    (folder / "encoder.json").write_text(json.dumps({s: i for i, s in enumerate(symbols)}))
    (folder / "vocab.bpe").write_text("#version: 0.2\n\u0120 t\n\u0120t h\n")
    (folder / "dict.txt").write_text("".join(f"{i} {1000 - i}\n" for i in range(len(symbols))))
    return folder / "encoder.json", folder / "vocab.bpe", folder / "dict.txt"


def test_prepare_with_gpt2_bpe_files(tmp_path):
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    encoder_json, vocab_bpe, dict_txt = write_gpt2_files(tmp_path)
    out = tmp_path / "bin"
    rc = prepare.main(["--data", str(shared_data("cnndm-small")), "--out", str(out), "--bpe",
                       "gpt2", "--gpt2-encoder-json", str(encoder_json), "--gpt2-vocab-bpe",
                       str(vocab_bpe), "--gpt2-dict", str(dict_txt), "--max-train-lines", "6",
                       "--max-eval-lines", "3", "--max-source-tokens", "300"])
    assert rc == 0
    bpe = get_encoder(str(encoder_json), str(vocab_bpe))
    raw = (shared_data("cnndm-small") / "test.target").read_text().splitlines()[:3]
    encoded = (out / "bpe" / "test.target").read_text().splitlines()
    assert [bpe.decode([int(t) for t in line.split()]) for line in encoded] == [r.strip() for r in raw]
    assert str(bpe.encoder["\u0120th"]) in encoded[0].split() or " th" not in raw[0]
    assert all(len(line.split()) <= 300 for line in (out / "bpe" / "train.source").read_text()
               .splitlines())
    assert (out / "dict.source.txt").read_text() == dict_txt.read_text()
    assert (out / "train.source-target.source.bin").stat().st_size > 0
    gen = recipe.generate_args(out, "CKPT", "train",
                               record=json.loads((out / "prepare.json").read_text()))
    assert gen[gen.index("--bpe") + 1] == "gpt2" and str(encoder_json) in gen


@pytest.mark.parametrize("which", ["--gpt2-encoder-json", "--gpt2-dict"])
def test_prepare_gpt2_missing_file_one_line(tmp_path, capsys, which):
    files = dict(zip(("--gpt2-encoder-json", "--gpt2-vocab-bpe", "--gpt2-dict"),
                     write_gpt2_files(tmp_path)))
    files[which] = tmp_path / "missing"
    out = tmp_path / "bin"
    argv = ["--data", str(shared_data("cnndm-small")), "--out", str(out), "--bpe", "gpt2"]
    rc = prepare.main(argv + [x for flag, path in files.items() for x in (flag, str(path))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"{which} file not found" in err[0], err
    assert not out.exists()


# ---- experiments.compare in summarization mode -----------------------------------------------------------

@pytest.mark.experiments
def test_compare_runner_summarization(cnndm_bin, tmp_path):
    out = tmp_path / "cmp"
    rc = compare.main(["--data-bin", str(cnndm_bin), "--out", str(out), "--schemes", "dense,adaptive",
                       "--max-update", "4", "--validate-interval-updates", "2", "--max-tokens",
                       "2048", "--beam", "1", "--max-len-b", "8", "--min-len", "2",
                       "--threads", "1"])
    assert rc == 0
    report = json.loads((out / "compare.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["dense", "adaptive"] and report["reference"] == "adaptive"
    for r in runs.values():
        assert r["task_kind"] == "summarization" and r["metric"] == "ROUGE-L"
        assert "--truncate-source" in r["command"] and "adaptive_moe_bart_tiny" in r["command"]
        assert r["updates"] == 4 and [v["update"] for v in r["valid"]][:2] == [2, 4]
        assert 0 <= r["rouge"]["rouge1"] <= 100 and r["score"] == r["rouge"]["rougeL"]
        assert r["eval"] == {"beam": 1, "max_len_b": 8, "min_len": 2, "lenpen": 2.0,
                             "no_repeat_ngram_size": 3}
    assert runs["dense"]["rouge_top1"] is None and runs["adaptive"]["rouge_top1"] is not None
    assert runs["dense"]["flops_per_token"] < runs["adaptive"]["flops_per_token"]
    a = runs["adaptive"]
    d, f, E = a["model"]["encoder_embed_dim"], a["model"]["encoder_ffn_embed_dim"], 4
    assert (d, f) == (128, 512)
    S, L = a["src_len"], a["ctx_len"]
    assert 100 < S <= 122 and L < S  # articles cut at 120 pieces (+ </s>), summaries shorter
    # the whole-model count of fairseq_adaptive_moe.tools.flops, written out: a multiply-add is 2
    # FLOPs; decoder self-attention sees (L + 1) / 2 positions on average; the encoder-decoder
    # attention's k/v projections run once per source token (here charged per target token)
    per_layer = {}
    for layer, share in a["train_moe_2x_layers"].items():
        attn = 8 * d * d + 4 * S * d if layer.startswith("enc") else \
            (8 * d * d + 4 * (L + 1) / 2 * d) + (4 * d * d + 4 * S * d) + 4 * d * d * S / L
        per_layer[layer] = attn + (1 + share) * 4 * d * f + 2 * d * E
    assert a["flops_per_layer"] == pytest.approx(per_layer)
    side = lambda p: sum(v for k, v in per_layer.items() if k.startswith(p))
    output = 2 * d * a["model"]["vocab"]  # per target token
    assert a["flops_per_token"] == pytest.approx(
        (S * side("enc") + L * (side("dec") + output)) / (S + L))
    md = (out / "compare.md").read_text()
    assert "ROUGE-1/2/L" in md and "| adaptive |" in md
    assert "| paper: adaptive (CNN/DM) |" in md and "ROUGE-1 43.3" in md  # Table 3, summarization
    assert (out / "compare.png").stat().st_size > 1000
    log = (out / "runs" / "adaptive" / "train.log").read_text()
    assert {"train_moe_2x_enc0", "train_moe_2x_dec1"} <= set(train_log_records(log, "train")[-1])
