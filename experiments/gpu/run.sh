#!/usr/bin/env bash
# The GPU measurement suite in one command, from the root of a clone, on any machine with a CUDA GPU:
#
#   bash experiments/gpu/run.sh OUT_DIR [STAGE ...]
#
# Needs: python (PYTHON, default python3) with a CUDA torch and fairseq (experiments/README.md
# shows an install on a machine without internet; the clone itself goes on PYTHONPATH here),
# nvidia-smi, GNU timeout and tar, and for the two training stages a data-bin made by
# examples/translation/prepare.py (TP_DATA, default data-bin/wmt-news: WMT news de-en, any
# translation data-bin works; CMP_DATA, default data-bin/m30k: Multi30k de-en, --vocab-size 8000).
#
# Stages, in the order given (default: bench fp16 throughput compiled, about 9 minutes in all):
#   bench       adaptive-moe-bench --device cuda: the paper's shape, 4k/16k/64k tokens, every
#               implementation but ours_compiled                         (limit 150 s) -> bench/
#   fp16        ours with fp16 weights and inputs, as under fairseq's --fp16 (the expert GEMMs run
#               in bf16, so the weights are cast each step): against bench's bf16 ours, the cost
#               of that cast                                              (limit 60 s) -> bench-fp16/
#   throughput  python -m experiments.throughput --gpu: fairseq-train words/s, top2 against
#               adaptive (T = 0.1), with the MoE share of the step, adaptive_moe_transformer_wmt19_de_en
#               on TP_DATA; each scheme trains for TP_SECONDS (75) s of training time, since the
#               step time is not known beforehand                        (limit 270 s) -> throughput/
#   compiled    the bench's ours_compiled (torch.compile, reduce-overhead) against ours at 4k and
#               16k tokens                                               (limit 150 s) -> bench-compiled/
#   compare     python -m experiments.compare --gpu: dense/top1/top2/adaptive at
#               adaptive_moe_transformer_small on CMP_DATA, CMP_UPDATES (1500) updates
#                                                                         (limit 540 s) -> compare/
# Each stage has its own time limit in seconds (LIMIT_<STAGE>, e.g. LIMIT_COMPARE=900); a stage
# that runs past it is stopped and the next one starts. A failed stage does not stop the next.
# END_AT (optional, epoch seconds) is a deadline for the whole suite: each limit is cut to what is
# left before it, less 20 s for packing, and a stage with under 30 s left is skipped.
#
# The stages write under WORK (default: a folder in ${TMPDIR:-/tmp}), each stage's output in its
# folder and its log in <stage>.log, and nvidia-smi's line in gpu.txt. After every stage, OUT_DIR
# gets two files: gpu_check.tgz (all of WORK but checkpoints) and summary.txt (each stage's exit
# status and the seconds since the start, e.g. "bench=0(142s)"; 124 means the limit stopped it).
# A suite that is interrupted keeps the stages that finished. Judge the targets with
#   python -m experiments.targets OUT_DIR/gpu_check.tgz
# CPU=1 runs every stage at toy size on the CPU (to check this script without a GPU).
set -uo pipefail
out=${1:?usage: experiments/gpu/run.sh OUT_DIR [bench|fp16|throughput|compiled|compare ...]}
shift
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(bench fp16 throughput compiled)
py=${PYTHON:-python3}
cpu=${CPU:-0}
root=$(cd "$(dirname "$0")/../.." && pwd)  # the clone: `-m experiments.*` and the plugin from any folder
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
work=${WORK:-${TMPDIR:-/tmp}/gpu_check-work}

pack() {  # OUT/gpu_check.tgz and OUT/summary.txt from what WORK holds now
  tar -czf "$out/gpu_check.tgz.tmp" --exclude='*.pt' -C "$work" . && mv "$out/gpu_check.tgz.tmp" "$out/gpu_check.tgz"
  printf '%s\n' "${summary[@]}" > "$out/summary.txt"
}

stage() {  # name limit command...
  local name=$1 limit=$2 t0=$SECONDS rc left
  shift 2
  if [ -n "${END_AT:-}" ]; then
    left=$((END_AT - $(date +%s) - 20))
    if [ "$left" -lt 30 ]; then
      echo "== $name: skipped, ${left} s left before END_AT"
      summary+=("$name=skipped(${SECONDS}s)")
      return
    fi
    [ "$left" -ge "$limit" ] || limit=$left
  fi
  echo "== $name: $* (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" > "$work/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  grep -v "Warning\|warn(\|^INFO\|^DEBUG" "$work/$name.log" | tail -n 45
  summary+=("$name=$rc(${SECONDS}s)")
  pack
}

if [ "$cpu" = 1 ]; then
  bench_dev=(--device cpu --quick) bench_tokens=(--tokens 256) fp16_tokens=(--tokens 256)
  tp_args=(--arch adaptive_moe_transformer_tiny --max-tokens 1500 --max-update 100000 --time-budget 4
           --skip 2 --windows 3)
  tp_data=${TP_DATA:-data-bin/wmt-news}
  cmp_args=(--arch adaptive_moe_transformer_tiny --max-update 4 --validate-interval-updates 2
            --max-tokens 1500 --beam 1 --max-len-b 8)
  compiled_dtype=(--dtype bfloat16)
else
  bench_dev=(--device cuda) bench_tokens=(--tokens 4096,16384) fp16_tokens=(--tokens 4096,16384,65536)
  tp_args=(--gpu --arch adaptive_moe_transformer_wmt19_de_en --max-tokens 8192
           --max-update 100000 --time-budget "${TP_SECONDS:-75}" --skip "${TP_SKIP:-30}"
           --windows "${TP_WINDOWS:-50}"
           --lr 5e-4 --warmup-updates 100)
  tp_data=${TP_DATA:-data-bin/wmt-news}
  cmp_args=(--gpu --arch adaptive_moe_transformer_small --max-update "${CMP_UPDATES:-1500}"
            --validate-interval-updates 250 --max-tokens 8192 --lr 1e-3)
  compiled_dtype=()
fi

for s in "${stages[@]}"; do
  case $s in bench|fp16|throughput|compiled|compare) ;;
    *) echo "run.sh: error: unknown stage '$s' (bench, fp16, throughput, compiled, compare)" >&2
       exit 2 ;;
  esac
done
summary=()
if [ -e "$work" ] && [ ! -f "$work/.gpu_check-work" ] && [ -n "$(ls -A "$work" 2>/dev/null)" ]; then
  echo "run.sh: error: WORK=$work exists and is not an earlier gpu_check work folder" >&2
  exit 2
fi
rm -rf "$work" && mkdir -p "$work" "$out" && touch "$work/.gpu_check-work" || exit 2
[ "$cpu" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  > "$work/gpu.txt" 2>&1
for s in "${stages[@]}"; do
  case $s in
    bench)
      stage bench "${LIMIT_BENCH:-150}" "$py" -m fairseq_adaptive_moe.cli.bench "${bench_dev[@]}" \
        --implementations ours,ours_trimmed,ours_graphed,loop,padded_einsum,fairscale,dense --out "$work/bench" ;;
    fp16)
      stage fp16 "${LIMIT_FP16:-60}" "$py" -m fairseq_adaptive_moe.cli.bench "${bench_dev[@]}" \
        "${fp16_tokens[@]}" --dtype float16 --implementations ours --out "$work/bench-fp16" ;;
    throughput)
      stage throughput "${LIMIT_THROUGHPUT:-270}" "$py" -m experiments.throughput \
        --data-bin "$tp_data" --out "$work/throughput" "${tp_args[@]}" ;;
    compiled)
      stage compiled "${LIMIT_COMPILED:-150}" "$py" -m fairseq_adaptive_moe.cli.bench "${bench_dev[@]}" \
        "${bench_tokens[@]}" "${compiled_dtype[@]}" --implementations ours,ours_compiled \
        --out "$work/bench-compiled" ;;
    compare)
      stage compare "${LIMIT_COMPARE:-540}" "$py" -m experiments.compare \
        --data-bin "${CMP_DATA:-data-bin/m30k}" --out "$work/compare" "${cmp_args[@]}" ;;
  esac
done
pack
echo "== summary: ${summary[*]}"
