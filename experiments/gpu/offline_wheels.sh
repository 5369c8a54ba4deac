#!/usr/bin/env bash
# For a GPU machine without internet: download, on a machine that has it, what fairseq needs and
# the GPU machine lacks, into one folder to copy there with the clone; experiments/gpu/offline_install.sh
# installs it there.
#
#   bash experiments/gpu/offline_wheels.sh [DIR]        # default DIR: .whl (in the clone)
#
# The GPU machine is assumed to have Python, a CUDA torch, cython, numpy, sacrebleu and
# sentencepiece already (a usual CUDA image), but no fairseq. DIR gets:
# - binary wheels of hydra-core 1.3.2, omegaconf 2.3.0 and bitarray 3.12.3 for the GPU machine's
#   Python (TARGET_PYTHON_VERSION, default 3.12; manylinux x86_64);
# - the source distributions of antlr4-python3-runtime 4.9.3, fairscale 0.4.13 and fairseq-fixed
#   0.12.3.1 (reading fairseq's metadata imports torch: PY, default .venv/bin/python, must have
#   torch), which offline_install.sh builds there against that machine's torch (about 3 minutes on
#   16 cores);
# - prebuilt/: the same three built here, in seconds to install there, when a Python of the GPU
#   machine's version is found (TARGET_PYTHON, else python$TARGET_PYTHON_VERSION on PATH, else
#   pyenv's) and TARGET_TORCH names the GPU machine's torch version (default 2.11.0): they are built
#   in .venv-device/ against that torch, and prebuilt/torch.txt records it. Without such a Python
#   the step is skipped and offline_install.sh builds from source.
# Each step is skipped when its output exists. DIR is a few MB (the debug symbols of fairseq's
# compiled parts are stripped).
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-.whl}
pyver=${TARGET_PYTHON_VERSION:-3.12}
torch_version=${TARGET_TORCH:-2.11.0}
py=${PY:-.venv/bin/python}
[ -x "$py" ] || py=python3
mkdir -p "$dest"

if ! compgen -G "$dest/fairseq_fixed-*.tar.gz" > /dev/null; then
  plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64)
  for p in hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.12.3; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
      --implementation cp "${plat[@]}" -d "$dest" "$p"
  done
  "$py" -c "import torch" 2>/dev/null || { echo "offline_wheels: $py has no torch; set PY=/path/to/python-with-torch" >&2; exit 1; }
  "$py" -m pip download -q --no-deps --no-build-isolation -d "$dest" \
    antlr4-python3-runtime==4.9.3 fairscale==0.4.13 fairseq-fixed==0.12.3.1
fi

if [ ! -f "$dest/prebuilt/torch.txt" ]; then
  target=${TARGET_PYTHON:-}
  if [ -z "$target" ]; then
    for cand in "python$pyver" "$(pyenv root 2>/dev/null)"/versions/"$pyver"*/bin/python"$pyver"; do
      if "$cand" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$pyver'.split('.'))))" 2>/dev/null; then
        target=$cand; break
      fi
    done
  fi
  if [ -z "$target" ]; then
    echo "offline_wheels: no Python $pyver here (set TARGET_PYTHON): no prebuilt/; offline_install.sh builds from source"
  else
    vd=.venv-device
    [ -x $vd/bin/python ] || "$target" -m venv $vd
    $vd/bin/python -m pip install -q "pip<26" "setuptools<81" wheel "cython<3.2" "numpy==2.0.2" \
      "torch==$torch_version" 2> >(grep -v "is ignored: it is neither" >&2)
    rm -rf "$dest/prebuilt.tmp" && mkdir -p "$dest/prebuilt.tmp/unpack"
    # CUDA_HOME unset: the sdist lacks the sources of the CUDA extensions it would try to build
    env -u CUDA_HOME MAX_JOBS="$(nproc)" $vd/bin/python -m pip wheel -q --no-deps --no-build-isolation \
      --no-cache-dir -w "$dest/prebuilt.tmp" "$dest"/antlr4-python3-runtime-*.tar.gz \
      "$dest"/fairscale-*.tar.gz "$dest"/fairseq_fixed-*.tar.gz
    # the debug symbols are most of the wheel's size
    whl=$(ls "$dest"/prebuilt.tmp/fairseq_fixed-*.whl)
    $vd/bin/python -m wheel unpack -d "$dest/prebuilt.tmp/unpack" "$whl" > /dev/null
    find "$dest/prebuilt.tmp/unpack" -name "*.so" -exec strip --strip-debug {} +
    rm "$whl"
    $vd/bin/python -m wheel pack -d "$dest/prebuilt.tmp" "$dest"/prebuilt.tmp/unpack/* > /dev/null
    rm -rf "$dest/prebuilt.tmp/unpack"
    $vd/bin/python -c "import torch; print(torch.__version__)" > "$dest/prebuilt.tmp/torch.txt"
    mv "$dest/prebuilt.tmp" "$dest/prebuilt"
    echo "offline_wheels: fairseq prebuilt for torch $(cat "$dest/prebuilt/torch.txt") in $dest/prebuilt/"
  fi
fi
du -sh "$dest"
