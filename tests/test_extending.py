"""Building on the plugin: the decoder-only LM, the docs/extending.md how-to, a custom architecture."""

import json
import logging
import re

import pytest

import fairseq_adaptive_moe  # noqa: F401
from conftest import ROOT, TINY_LM, USER_DIR, run_cli
from fairseq.models import register_model, register_model_architecture
from fairseq_adaptive_moe.models import (
    AdaptiveMoETransformerDecoder,
    AdaptiveMoETransformerModel,
    adaptive_moe_transformer_tiny,
)

pytestmark = pytest.mark.slow

LM_TRAIN = TINY_LM


def json_records(text, kind="train_inner"):
    return [json.loads(line.split(f"| {kind} | ", 1)[1]) for line in text.splitlines()
            if f"| {kind} | " in line]


def test_lm_trains_resumes_and_evaluates(news_en_bin, tmp_path):
    save = tmp_path / "ckpt"
    proc = run_cli("fairseq-train", news_en_bin, *LM_TRAIN, "--save-dir", save, "--max-update", "4")
    records = json_records(proc.stdout + proc.stderr)
    assert [int(r["num_updates"]) for r in records] == [1, 2, 3, 4]
    assert all(0 <= float(r["moe_2x_dec0"]) <= 1 and "moe_2x_dec1" in r for r in records)
    valid = json_records(proc.stdout + proc.stderr, "valid")[-1]  # both validation losses
    assert {"valid_loss", "valid_ppl", "valid_loss_top1", "valid_ppl_top1"} <= set(valid)
    assert float(valid["valid_moe_2x"]) > 0  # valid_loss and its routing: the training gating

    proc = run_cli("fairseq-train", news_en_bin, *LM_TRAIN, "--save-dir", save, "--max-update", "6")
    log = proc.stdout + proc.stderr
    assert "@ 4 updates" in log
    assert [int(r["num_updates"]) for r in json_records(log)] == [5, 6]

    ppl = {}
    for name, extra in (("top1", []), ("train", ["--model-overrides", "{'moe_eval_gating': 'train'}"])):
        proc = run_cli("fairseq-eval-lm", news_en_bin, "--user-dir", USER_DIR,
                       "--path", save / "checkpoint_last.pt", "--gen-subset", "test",
                       "--tokens-per-sample", "64", "--cpu", *extra)
        match = re.search(r"Perplexity: ([0-9.]+)", proc.stdout + proc.stderr)
        assert match, (proc.stdout + proc.stderr)[-2000:]
        ppl[name] = float(match.group(1))
    assert all(1 < p < 2000 for p in ppl.values())  # below uniform over the 1000-piece vocab x2


def readme_howto() -> str:
    text = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
    block = text.split("<!-- howto:begin -->", 1)[1].split("<!-- howto:end -->", 1)[0]
    return block.split("```python", 1)[1].split("```", 1)[0]


def test_readme_howto_runs_as_written(m30k_bin, tmp_path):
    plugin = tmp_path / "my_moe"
    plugin.mkdir()
    (plugin / "__init__.py").write_text(readme_howto(), encoding="utf-8")
    assert len(readme_howto().strip().splitlines()) <= 45
    proc = run_cli("fairseq-train", m30k_bin, "--user-dir", plugin, "--task", "translation",
                   "--arch", "my_moe_tiny", "--share-all-embeddings",
                   "--criterion", "adaptive_moe_label_smoothed_cross_entropy",
                   "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "1500", "--cpu",
                   "--max-update", "2", "--log-format", "json", "--log-interval", "1",
                   "--no-progress-bar", "--save-dir", tmp_path / "ckpt")
    log = proc.stdout + proc.stderr
    record = json_records(log)[-1]
    assert "moe_2x_dec1" in record
    assert not [k for k in record if k.startswith("moe_2x_enc") or k == "moe_2x_dec0"]
    assert "LastLayerMoEDecoder" in log and "num_experts=8" in log  # the model printout


# A custom architecture defined here, the documented way: MoE in the encoder's first layer only,
# two experts, decoder dense.
class FirstLayerMoEEncoderDecoder(AdaptiveMoETransformerModel):
    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        class DenseDecoder(AdaptiveMoETransformerDecoder):
            def is_moe_layer(self, index, cfg):
                return False
        return DenseDecoder(cfg, tgt_dict, embed_tokens)


register_model("test_first_layer_moe")(FirstLayerMoEEncoderDecoder)


@register_model_architecture("test_first_layer_moe", "test_first_layer_moe_tiny")
def _tiny(args):
    args.moe_freq = getattr(args, "moe_freq", 2)  # layers 2, 4, ... of the encoder: layer index 1
    args.moe_expert_count = getattr(args, "moe_expert_count", 2)
    adaptive_moe_transformer_tiny(args)


def test_custom_architecture_in_process_gets_routing_statistics(m30k_bin, tmp_path, caplog):
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli.train import main as train_main

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(m30k_bin), "--task", "translation", "--arch", "test_first_layer_moe_tiny",
        "--share-all-embeddings", "--criterion", "adaptive_moe_label_smoothed_cross_entropy",
        "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "1500", "--cpu",
        "--max-update", "2", "--log-format", "json", "--log-interval", "1",
        "--no-progress-bar", "--no-save", "--save-dir", str(tmp_path / "ckpt"),
        "--disable-validation"])
    with caplog.at_level(logging.INFO):
        train_main(convert_namespace_to_omegaconf(args))
    records = [json.loads(r.getMessage()) for r in caplog.records
               if r.name.endswith("progress_bar") or r.getMessage().startswith("{\"epoch\"")]
    records = [r for r in records if "num_updates" in r and "moe_2x" in r]
    assert records, [r.getMessage()[:200] for r in caplog.records][-20:]
    assert set(k for k in records[-1] if k.startswith("moe_2x_")) == {"moe_2x_enc1"}
    assert 0.0 <= float(records[-1]["moe_2x"]) <= 1.0
