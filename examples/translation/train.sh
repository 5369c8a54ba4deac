#!/usr/bin/env bash
# Train one gating scheme on a data-bin made by prepare.py, with the same settings for every scheme.
#
#   examples/translation/train.sh [--preset small|wmt19] [--force] SCHEME DATA_BIN SAVE_DIR \
#       [more fairseq-train flags ...]
#
# SCHEME      dense     no MoE layer (--moe-freq 0), same code path and same other flags
#             top1      --moe-gating top1 (Switch)
#             top2      --moe-gating top2 (GShard)
#             adaptive  --moe-gating adaptive --moe-threshold $THRESHOLD (default 0.1)
# --preset    small (default): adaptive_moe_transformer_tiny on CPU, Multi30k-sized settings.
#             wmt19: adaptive_moe_transformer_wmt19_de_en (FSMT shape, 16 experts), GPU, --fp16.
# --force     retrain from scratch even if SAVE_DIR holds a finished run (its checkpoints go).
#
# Every preset value can be overridden by an environment variable: ARCH, MAX_TOKENS, UPDATE_FREQ,
# MAX_UPDATE, LR, WARMUP, DROPOUT, CLIP_NORM, BALANCE (--moe-balance-loss-weight), THRESHOLD,
# SEED, LOG_INTERVAL, CPU (1: --cpu), FP16 (1: --fp16), DRY_RUN (1: print the command, run
# nothing), LAUNCH (a launcher put before fairseq-train, e.g. LAUNCH="torchrun --nproc_per_node
# 8"). Flags after SAVE_DIR go to
# fairseq-train unchanged, after the preset's, so they win (e.g. --ddp-backend, --arch,
# --moe-expert-parallel-size P).
#
# SAVE_DIR gets the checkpoints, train.log, train-command.txt (written at the start) and
# train-finished (written when fairseq-train succeeded). A finished run is never retrained without
# --force. An unfinished one (killed) resumes from its checkpoint_last.pt if the command is the
# same, and is refused otherwise. Bad input: one line on stderr, exit status 2, nothing written.
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true
prog=train.sh
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
die() { echo "$prog: error: $*" >&2; exit 2; }

preset=small force=0
while [ $# -gt 0 ]; do
  case $1 in
    --preset) [ $# -ge 2 ] || die "--preset needs a value (small or wmt19)"; preset=$2; shift 2 ;;
    --preset=*) preset=${1#--preset=}; shift ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) break ;;
  esac
done
[ $# -ge 3 ] || die "usage: $prog [--preset small|wmt19] [--force] SCHEME DATA_BIN SAVE_DIR [fairseq-train flags ...]"
scheme=$1 data=$2 save=$3
shift 3

case $preset in
  small)
    : "${ARCH:=adaptive_moe_transformer_tiny}" "${MAX_TOKENS:=4096}" "${UPDATE_FREQ:=1}"
    : "${MAX_UPDATE:=1200}" "${LR:=2e-3}" "${WARMUP:=400}" "${DROPOUT:=0.1}" "${CLIP_NORM:=0}"
    : "${LOG_INTERVAL:=100}" "${CPU:=1}" "${FP16:=0}" ;;
  wmt19)
    # 8 GPUs x 4096 tokens x 16 = about 0.5M tokens per update (FSMT trained with batches of this
    # size; lr and schedule are fairseq's transformer-big recipe, our choice, not the paper's).
    : "${ARCH:=adaptive_moe_transformer_wmt19_de_en}" "${MAX_TOKENS:=4096}" "${UPDATE_FREQ:=16}"
    : "${MAX_UPDATE:=50000}" "${LR:=5e-4}" "${WARMUP:=4000}" "${DROPOUT:=0.2}" "${CLIP_NORM:=0.0}"
    : "${LOG_INTERVAL:=100}" "${CPU:=0}" "${FP16:=1}" ;;
  *) die "unknown preset '$preset' (choose small or wmt19)" ;;
esac
: "${BALANCE:=0.01}" "${THRESHOLD:=0.1}" "${SEED:=1}" "${LAUNCH:=}"

case $scheme in
  dense) gating=(--moe-freq 0) ;;
  top1|top2) gating=(--moe-gating "$scheme") ;;
  adaptive) gating=(--moe-gating adaptive --moe-threshold "$THRESHOLD") ;;
  *) die "unknown scheme '$scheme' (choose dense, top1, top2 or adaptive)" ;;
esac
compgen -G "$data/dict.*.txt" > /dev/null || die "no data-bin at $data (no dict.*.txt; run prepare.py first)"
[ ! -e "$save" ] || [ -d "$save" ] || die "SAVE_DIR exists and is not a directory: $save"

if [ -n "$LAUNCH" ]; then read -r -a launcher <<< "$LAUNCH"; else launcher=(); fi
trainer=$(command -v fairseq-train) || die "fairseq-train is not on PATH (activate the venv)"
device=()
[ "$CPU" = 1 ] && device+=(--cpu)
[ "$FP16" = 1 ] && device+=(--fp16)
cmd=("${launcher[@]}" "$trainer" "$data" --user-dir "$root/fairseq_adaptive_moe"
  --task translation --arch "$ARCH" --share-all-embeddings
  --criterion adaptive_moe_label_smoothed_cross_entropy --label-smoothing 0.1
  --moe-balance-loss-weight "$BALANCE"
  --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm "$CLIP_NORM"
  --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP" --warmup-init-lr 1e-07
  --dropout "$DROPOUT" --weight-decay 0.0001
  --max-tokens "$MAX_TOKENS" --update-freq "$UPDATE_FREQ" --max-update "$MAX_UPDATE"
  --seed "$SEED" --save-dir "$save" --no-epoch-checkpoints
  --log-format json --log-interval "$LOG_INTERVAL" --no-progress-bar
  "${device[@]}" "${gating[@]}" "$@")
printf -v command '%q ' "${cmd[@]}"
command=${command% }
if [ "${DRY_RUN:-0}" = 1 ]; then echo "$command"; exit 0; fi

if [ -e "$save/train-finished" ] && [ "$force" = 0 ]; then
  die "$save holds a finished run (train-finished); pass --force to retrain it from scratch"
fi
if [ -e "$save/train-command.txt" ] && [ "$force" = 0 ] && [ "$(cat "$save/train-command.txt")" != "$command" ]; then
  die "$save holds an unfinished run of another command (train-command.txt); pass --force to start over"
fi
if [ "$force" = 1 ] && [ -d "$save" ]; then
  echo "$prog: --force: removing the previous run's checkpoints and logs in $save"
  rm -f "$save"/checkpoint*.pt "$save/train.log" "$save/train-command.txt" "$save/train-finished"
elif [ -e "$save/checkpoint_last.pt" ]; then
  echo "$prog: resuming the unfinished run in $save from checkpoint_last.pt"
fi

mkdir -p "$save"
printf '%s\n' "$command" > "$save/train-command.txt"
echo "$prog: [$scheme, preset $preset] + $command"
"${cmd[@]}" 2>&1 | tee -a "$save/train.log"
date -u +%Y-%m-%dT%H:%M:%SZ > "$save/train-finished"
echo "$prog: finished: $save/checkpoint_last.pt (log: $save/train.log)"
