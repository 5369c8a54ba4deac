#!/usr/bin/env bash
# The CPU side of scripts/gpu_check.sh, run here before the device call: the packages fairseq
# needs on the offline GPU host (.whl, see ../shared/tools/README.md) and the data-bins its stages
# read. Each step is skipped when its output exists.
#
#   bash scripts/gpu_prepare.sh
#   then, through the device tool, with carry [".whl", "data-bin/wmt-news", "data-bin/m30k"]:
#   source .whl/device-install.sh .whl && bash scripts/gpu_check.sh "$OUT" [STAGE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_venv.sh
py=.venv/bin/python
if [ ! -f .whl/device-install.sh ]; then
  PY=$py bash ../shared/tools/device-wheels.sh .whl
  cp ../shared/tools/device-install.sh .whl/
fi
[ -f data-bin/wmt-news/dict.en.txt ] || "$py" examples/translation/prepare.py \
  --data ../shared/data/wmt19-deen-news --out data-bin/wmt-news --vocab-size 8000
[ -f data-bin/m30k/dict.en.txt ] || "$py" examples/translation/prepare.py \
  --data ../shared/data/multi30k-deen --out data-bin/m30k --vocab-size 8000
du -sh .whl data-bin/wmt-news data-bin/m30k
