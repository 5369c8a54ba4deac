#!/usr/bin/env bash
# The GPU measurements in one call, for a GPU host reached through the device tool:
#
#   source .whl/device-install.sh .whl && bash scripts/gpu_check.sh "$OUT" [STAGE ...]
#
# (.whl from ../shared/tools/device-wheels.sh; carry .whl and the data-bins the stages read.)
# Stages, in order (default: bench throughput, about 6 minutes after the 3-minute install, so that
# one 600 s device call holds them; run compiled, then compare, in further calls while warm):
#   bench       adaptive-moe-bench --device cuda: paper shape, 4k/16k/64k tokens, every
#               implementation but ours_compiled                          -> OUT/bench/
#   throughput  fairseq-train words/s, top2 vs adaptive (T = 0.1), with the MoE share of the
#               step, adaptive_moe_transformer_wmt19_de_en on data-bin/wmt-news
#               (examples/translation/prepare.py --data ../shared/data/wmt19-deen-news)
#                                                                          -> OUT/throughput/
#   compiled    the bench's ours_compiled (torch.compile, reduce-overhead) against ours at 4k and
#               16k tokens                                                 -> OUT/bench-compiled/
#   compare     compare.py --gpu: dense/top1/top2/adaptive at adaptive_moe_transformer_small on
#               data-bin/m30k (prepare.py, Multi30k, --vocab-size 8000)    -> OUT/compare/
# Each stage has its own time limit (seconds, env LIMIT_<STAGE>), its log in OUT/<stage>.log and
# its exit status on the summary line; a failed stage does not stop the next.
# CPU=1 runs every stage at toy size on the CPU (to check this script without a GPU).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [bench|throughput|compiled|compare ...]}
shift
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(bench throughput)
mkdir -p "$out"
py=${PYTHON:-python3}
cpu=${CPU:-0}

stage() {  # name limit command...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name: $* (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  grep -v "Warning\|warn(\|^INFO\|^DEBUG" "$out/$name.log" | tail -n 45
  summary+=("$name=$rc(${SECONDS}s)")
}

if [ "$cpu" = 1 ]; then
  bench_dev=(--device cpu --quick) bench_tokens=(--tokens 256)
  tp_args=(--arch adaptive_moe_transformer_tiny --max-tokens 1500 --max-update 6 --skip 2 --windows 3)
  tp_data=${TP_DATA:-data-bin/wmt-news}
  cmp_args=(--arch adaptive_moe_transformer_tiny --max-update 4 --validate-interval-updates 2
            --max-tokens 1500 --beam 1 --max-len-b 8)
  compiled_dtype=(--dtype bfloat16)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
  bench_dev=(--device cuda) bench_tokens=(--tokens 4096,16384)
  tp_args=(--gpu --arch adaptive_moe_transformer_wmt19_de_en --max-tokens 8192
           --max-update "${TP_UPDATES:-120}" --skip "${TP_SKIP:-60}" --windows "${TP_WINDOWS:-30}"
           --lr 5e-4 --warmup-updates 100)
  tp_data=${TP_DATA:-data-bin/wmt-news}
  cmp_args=(--gpu --arch adaptive_moe_transformer_small --max-update "${CMP_UPDATES:-1500}"
            --validate-interval-updates 250 --max-tokens 8192 --lr 1e-3)
  compiled_dtype=()
fi

for s in "${stages[@]}"; do
  case $s in bench|throughput|compiled|compare) ;;
    *) echo "gpu_check.sh: error: unknown stage '$s' (bench, throughput, compiled, compare)" >&2
       exit 2 ;;
  esac
done
summary=()
for s in "${stages[@]}"; do
  case $s in
    bench)
      stage bench "${LIMIT_BENCH:-150}" "$py" -m fairseq_adaptive_moe.cli.bench "${bench_dev[@]}" \
        --implementations ours,ours_trimmed,ours_graphed,loop,padded_einsum,fairscale,dense --out "$out/bench" ;;
    throughput)
      stage throughput "${LIMIT_THROUGHPUT:-240}" "$py" examples/translation/throughput.py \
        --data-bin "$tp_data" --out "$out/throughput" "${tp_args[@]}" ;;
    compiled)
      stage compiled "${LIMIT_COMPILED:-150}" "$py" -m fairseq_adaptive_moe.cli.bench "${bench_dev[@]}" \
        "${bench_tokens[@]}" "${compiled_dtype[@]}" --implementations ours,ours_compiled \
        --out "$out/bench-compiled" ;;
    compare)
      stage compare "${LIMIT_COMPARE:-540}" "$py" examples/translation/compare.py \
        --data-bin "${CMP_DATA:-data-bin/m30k}" --out "$out/compare" "${cmp_args[@]}" ;;
  esac
done
echo "== summary: ${summary[*]}"
