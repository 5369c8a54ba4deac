#!/usr/bin/env bash
# Builds .venv/ in the repository root: pinned CPU torch, fairseq (built against that torch),
# the other dependencies, and this plugin in editable mode. Idempotent: a finished venv is
# recognised by its stamp and a second run returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # the local CPU build; never the multi-GB CUDA one
STAMP="$VENV/.adaptive-moe-setup"
want="$(cat setup.py scripts/setup_venv.sh | sha1sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install -q --upgrade "pip<26" "setuptools<81" wheel
pip install -q "$TORCH_SPEC" "cython<3.2" "numpy<2.3"
# fairseq imports torch while building: build it against the torch installed above.
if ! "$VENV/bin/python" -c "import fairseq" 2>/dev/null; then
  if "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    FAIRSEQ="fairseq-fixed==0.12.3.1"
  else
    FAIRSEQ="fairseq==0.12.2"
  fi
  # torchaudio is a declared dependency used only by speech tasks; 2.11.0 declares no torch pin.
  pip install -q --no-build-isolation "$FAIRSEQ" "torchaudio==2.11.0" "$TORCH_SPEC"
fi
pip install -q --no-build-isolation -e ".[dev]" "$TORCH_SPEC"
echo "$want" > "$STAMP"
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch, fairseq; print("torch", torch.__version__, "fairseq", fairseq.__version__)'))"
