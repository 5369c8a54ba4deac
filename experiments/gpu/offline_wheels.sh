#!/usr/bin/env bash
# The CPU side of scripts/gpu_check.sh, run here before the device call: the packages fairseq
# needs on the offline GPU host (.whl, see ../shared/tools/README.md), fairseq pre-built for that
# host (.whl/prebuilt/), and the data-bins its stages read. Each step is skipped when its output
# exists.
#
#   bash scripts/gpu_prepare.sh
#   then, through the device tool, with carry [".whl", "data-bin/wmt-news"] (and "data-bin/m30k"
#   for the compare stage):
#   source scripts/gpu_install.sh .whl && bash scripts/gpu_check.sh "$OUT" [STAGE ...]
#
# The pre-built wheels save the 3-minute fairseq build on the host, a fifth of a 15-minute device
# session. They are built here with a Python 3.12 (PY312, else python3.12 on PATH, else pyenv's)
# against the host's torch (DEVICE_TORCH, default 2.11.0: python3 on the H200 image, Python
# 3.12.3, as the device tool's KINDS.md lists it), in .venv-device/. Without a Python 3.12 the
# step is skipped and gpu_install.sh builds fairseq there from source, as before.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup_venv.sh
py=.venv/bin/python
if [ ! -f .whl/device-install.sh ]; then
  PY=$py bash ../shared/tools/device-wheels.sh .whl
  cp ../shared/tools/device-install.sh .whl/
fi
if [ ! -f .whl/prebuilt/torch.txt ]; then
  py312=${PY312:-}
  if [ -z "$py312" ]; then
    for cand in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
      if "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
        py312=$cand; break
      fi
    done
  fi
  if [ -z "$py312" ]; then
    echo "gpu_prepare: no Python 3.12 here (set PY312): no pre-built fairseq; the device builds it"
  else
    vd=.venv-device
    [ -x $vd/bin/python ] || "$py312" -m venv $vd
    $vd/bin/python -m pip install -q "pip<26" "setuptools<81" wheel "cython<3.2" "numpy==2.0.2" \
      "torch==${DEVICE_TORCH:-2.11.0}" 2> >(grep -v "is ignored: it is neither" >&2)
    rm -rf .whl/prebuilt.tmp && mkdir -p .whl/prebuilt.tmp/unpack
    # CUDA_HOME unset: the sdist lacks the sources of the CUDA extensions it would try to build
    env -u CUDA_HOME MAX_JOBS=$(nproc) $vd/bin/python -m pip wheel -q --no-deps --no-build-isolation \
      --no-cache-dir -w .whl/prebuilt.tmp .whl/antlr4-python3-runtime-*.tar.gz .whl/fairscale-*.tar.gz \
      .whl/fairseq_fixed-*.tar.gz
    # debug symbols are most of the wheel's size, which counts against the device call's 64 MiB
    whl=$(ls .whl/prebuilt.tmp/fairseq_fixed-*.whl)
    $vd/bin/python -m wheel unpack -d .whl/prebuilt.tmp/unpack "$whl" > /dev/null
    find .whl/prebuilt.tmp/unpack -name "*.so" -exec strip --strip-debug {} +
    rm "$whl"
    $vd/bin/python -m wheel pack -d .whl/prebuilt.tmp .whl/prebuilt.tmp/unpack/* > /dev/null
    rm -rf .whl/prebuilt.tmp/unpack
    $vd/bin/python -c "import torch; print(torch.__version__)" > .whl/prebuilt.tmp/torch.txt
    mv .whl/prebuilt.tmp .whl/prebuilt
    echo "gpu_prepare: pre-built fairseq for torch $(cat .whl/prebuilt/torch.txt) in .whl/prebuilt/"
  fi
fi
[ -f data-bin/wmt-news/dict.en.txt ] || "$py" examples/translation/prepare.py \
  --data ../shared/data/wmt19-deen-news --out data-bin/wmt-news --vocab-size 8000
[ -f data-bin/m30k/dict.en.txt ] || "$py" examples/translation/prepare.py \
  --data ../shared/data/multi30k-deen --out data-bin/m30k --vocab-size 8000
du -sh .whl data-bin/wmt-news data-bin/m30k
