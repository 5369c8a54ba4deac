#!/usr/bin/env bash
# sacreBLEU of one checkpoint under top-1 gating (the paper's protocol, printed first) and under
# its training gating, each printed with sacreBLEU's signature. Both gatings are passed explicitly
# (--model-overrides), so a checkpoint's saved --moe-eval-gating does not matter.
#
#   examples/translation/evaluate.sh DATA_BIN CHECKPOINT [more fairseq-generate flags ...]
#
# DATA_BIN is a data-bin made by prepare.py (the references are its raw/SUBSET.TGT). A dense
# checkpoint (--moe-freq 0) has no gate, so its top-1 line is skipped with a note.
# Environment: SUBSET (test), TGT (en), BEAM (5), LENPEN (1), MAX_TOKENS (8000), CPU (auto: --cpu
# when torch sees no GPU; 1 or 0 to force), OUT (where gen-*.txt go; default: the checkpoint's
# folder, as eval-SUBSET-CHECKPOINT_NAME/). Flags after CHECKPOINT go to both fairseq-generate runs
# (e.g. --fp16, --max-len-b 200, --batch-size 64). --required-batch-size-multiple 1 is always given:
# with fairseq's default of 8, fairseq-generate silently drops the last batch when its size is not a
# multiple of 8 (fairseq issue #5036), and those sentences would score as empty.
# Bad input: one line on stderr, exit status 2.
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true
prog=evaluate.sh
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
die() { echo "$prog: error: $*" >&2; exit 2; }

case ${1:-} in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
[ $# -ge 2 ] || die "usage: $prog DATA_BIN CHECKPOINT [fairseq-generate flags ...]"
data=$1 ckpt=$2
shift 2
: "${SUBSET:=test}" "${TGT:=en}" "${BEAM:=5}" "${LENPEN:=1}" "${MAX_TOKENS:=8000}" "${CPU:=auto}"
ref=$data/raw/$SUBSET.$TGT
[ -f "$ckpt" ] || die "no checkpoint at $ckpt"
[ -f "$ref" ] || die "no raw reference $ref (make DATA_BIN with prepare.py; SUBSET=$SUBSET TGT=$TGT)"
generator=$(command -v fairseq-generate) || die "fairseq-generate is not on PATH (activate the venv)"
py=$(dirname "$generator")/python
[ -x "$py" ] || py=python
: "${OUT:=$(dirname "$ckpt")/eval-$SUBSET-$(basename "$ckpt" .pt)}"

# What the checkpoint was trained with; mmap, so a large checkpoint is not read into memory.
read -r moe_freq gating threshold cuda < <("$py" - "$ckpt" <<'PY'
import logging
import sys
logging.basicConfig(level=logging.ERROR)
import torch
import fairseq_adaptive_moe  # noqa: F401  (allow-lists the types fairseq checkpoints hold)
try:
    state = torch.load(sys.argv[1], map_location="cpu", mmap=True)
except Exception as e:
    sys.exit(f"evaluate.sh: error: cannot read checkpoint {sys.argv[1]}: {e}")
cfg = state["cfg"]["model"] if state.get("cfg") is not None else state["args"]
get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
print(get("moe_freq", 0) or 0, get("moe_gating", "-"), get("moe_threshold", "-"),
      int(torch.cuda.is_available()))
PY
) || exit 2
[ -n "${moe_freq:-}" ] || exit 2
if [ "$CPU" = auto ]; then CPU=$(( 1 - cuda )); fi
device=()
[ "$CPU" = 1 ] && device+=(--cpu)

mkdir -p "$OUT"
gen() {  # gen NAME LABEL [fairseq-generate flags ...]
  local name=$1 label=$2; shift 2
  local out=$OUT/gen-$name.txt
  if ! "$generator" "$data" --user-dir "$root/fairseq_adaptive_moe" --path "$ckpt" \
      --gen-subset "$SUBSET" --beam "$BEAM" --lenpen "$LENPEN" --max-tokens "$MAX_TOKENS" \
      --required-batch-size-multiple 1 --post-process sentencepiece "${device[@]}" "$@" \
      > "$out" 2> "$OUT/gen-$name.log"; then
    echo "$prog: error: fairseq-generate failed, see $OUT/gen-$name.log: $(tail -n 1 "$OUT/gen-$name.log")" >&2
    exit 1
  fi
  echo "BLEU $SUBSET, $label: $("$py" "$here/score.py" "$out" "$ref")"
}

echo "$prog: $ckpt on $data ($SUBSET); outputs in $OUT"
if [ "$moe_freq" = 0 ]; then
  gen train "dense" "$@"
  echo "BLEU $SUBSET, top-1 gating: skipped: dense checkpoint (--moe-freq 0), it has no gate"
else
  trained=$gating
  [ "$gating" = adaptive ] && trained="adaptive T=$threshold"
  gen top1 "top-1 gating" "$@" --model-overrides "{'moe_eval_gating': 'top1'}"
  gen train "training gating ($trained)" "$@" --model-overrides "{'moe_eval_gating': 'train'}"
fi
