#!/usr/bin/env bash
# The main job: raw Multi30k de->en text -> sentencepiece + fairseq-preprocess -> fairseq-train of
# the tiny adaptive-gating MoE on CPU -> fairseq-generate -> sacreBLEU, plus the share of tokens
# that took two experts.
#
#   examples/translation/demo.sh [DATA_DIR] [OUT_DIR]
#
# DATA_DIR holds {train,valid,test}.{de,en} raw text (default: ../shared/data/multi30k-deen).
# Environment knobs: MAX_UPDATE (default 1200), GATING (adaptive), THRESHOLD (0.1), EXTRA_TRAIN_ARGS.
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
data=${1:-$root/../shared/data/multi30k-deen}
out=${2:-$root/demo-out}
py=${PYTHON:-python}
bin=$(dirname "$(command -v "$py")")
MAX_UPDATE=${MAX_UPDATE:-1200}
GATING=${GATING:-adaptive}
THRESHOLD=${THRESHOLD:-0.1}


"$py" "$here/prepare.py" --data "$data" --out "$out/data-bin" --vocab-size 8000

ckpt="$out/checkpoints-$GATING"
start=$(date +%s)
"$bin/fairseq-train" "$out/data-bin" \
  --user-dir "$root/fairseq_adaptive_moe" \
  --task translation --arch adaptive_moe_transformer_tiny --share-all-embeddings \
  --moe-gating "$GATING" --moe-threshold "$THRESHOLD" \
  --criterion adaptive_moe_label_smoothed_cross_entropy --label-smoothing 0.1 \
  --optimizer adam --adam-betas '(0.9, 0.98)' --lr 2e-3 --lr-scheduler inverse_sqrt \
  --warmup-updates 400 --dropout 0.1 --weight-decay 0.0001 \
  --max-tokens 4096 --max-update "$MAX_UPDATE" --cpu --seed 1 \
  --save-dir "$ckpt" --no-epoch-checkpoints --keep-last-epochs 1 \
  --log-format json --log-interval 100 \
  ${EXTRA_TRAIN_ARGS:-} 2>&1 | tee "$out/train-$GATING.log"
train_s=$(( $(date +%s) - start ))

gen() {  # gen NAME [fairseq-generate args...]
  local name=$1; shift
  "$bin/fairseq-generate" "$out/data-bin" --user-dir "$root/fairseq_adaptive_moe" \
    --path "$ckpt/checkpoint_last.pt" --gen-subset test --cpu --beam 5 --max-tokens 8000 --required-batch-size-multiple 1 \
    --post-process sentencepiece "$@" > "$out/gen-$GATING-$name.txt" 2> "$out/gen-$GATING-$name.log"
  echo "BLEU ($name gating, test): $("$py" "$here/score.py" "$out/gen-$GATING-$name.txt" "$out/data-bin/raw/test.en")"
}
echo "=== demo result: $GATING gating, T=$THRESHOLD, $MAX_UPDATE updates, ${train_s}s of CPU training ==="
gen top1 --model-overrides "{'moe_eval_gating': 'top1'}"   # the paper's evaluation (the default)
gen train --model-overrides "{'moe_eval_gating': 'train'}"
"$py" - "$out/train-$GATING.log" <<'PY'
import json, sys
last = {}
for line in open(sys.argv[1], encoding="utf-8"):
    if "| valid |" in line or "| train |" in line:
        kind = "valid" if "| valid |" in line else "train"
        last[kind] = json.loads(line.split(f"| {kind} | ", 1)[1])
for kind, rec in last.items():
    layers = {k.split("_2x_")[1]: v for k, v in rec.items() if "_2x_" in k}
    print(f"two-expert tokens ({kind}, last epoch): {float(rec[kind + '_moe_2x']):.1%} of tokens; "
          f"per layer: " + ", ".join(f"{n} {float(v):.1%}" for n, v in sorted(layers.items())))
PY
