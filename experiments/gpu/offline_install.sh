# Sourced on the GPU host, first thing in a device call, from the project root:
#
#   source scripts/gpu_install.sh .whl && bash scripts/gpu_check.sh "$OUT"
#
# Installs fairseq and its missing dependencies into /tmp/site and puts /tmp/site and the project
# on PYTHONPATH, /tmp/site/bin on PATH. With the wheels that scripts/gpu_prepare.sh pre-builds
# (.whl/prebuilt/, built against the host's torch, named in .whl/prebuilt/torch.txt) this takes
# seconds. Where they are missing or were built against another torch, it falls back to
# ../shared/tools' device-install.sh (.whl/device-install.sh), which builds fairseq from source
# there (about 3 minutes of device time).
_whl=${1:-.whl}
_pre=$_whl/prebuilt
_host_torch=$(python3 -c "import torch; print(torch.__version__)" 2>/dev/null)
if PYTHONPATH=/tmp/site python3 -c "import fairseq" 2>/dev/null; then
  echo "gpu_install: fairseq already in /tmp/site"
  source "$_whl/device-install.sh" "$_whl"  # only sets the paths and prints versions now
elif [ -f "$_pre/torch.txt" ] && [ "$(cat "$_pre/torch.txt")" = "$_host_torch" ]; then
  echo "gpu_install: pre-built wheels for torch $_host_torch"
  # the compiled parts fairseq-train needs must load there (system libraries differ between
  # images); loaded by path, so that this checks them and not the rest of fairseq's imports
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
       "$_whl"/*.whl "$_pre"/*.whl > /tmp/site-install.log 2>&1 &&
     python3 - >> /tmp/site-install.log 2>&1 <<'PY'
import glob, importlib.util
for name in ("data_utils_fast", "token_block_utils_fast"):
    path, = glob.glob(f"/tmp/site/fairseq/data/{name}.*.so")
    spec = importlib.util.spec_from_file_location(name, path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
PY
  then
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
    python3 -c "import torch, fairseq; print('torch', torch.__version__, 'fairseq', fairseq.__version__, 'cuda', torch.cuda.is_available())"
  else
    tail -5 /tmp/site-install.log
    echo "gpu_install: the pre-built wheels failed there; building fairseq from source"
    rm -rf /tmp/site
    source "$_whl/device-install.sh" "$_whl"
  fi
else
  echo "gpu_install: no pre-built wheels for torch ${_host_torch:-?} (have: $(cat "$_pre/torch.txt" 2>/dev/null || echo none)); building fairseq from source"
  source "$_whl/device-install.sh" "$_whl"
fi
