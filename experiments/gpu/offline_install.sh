# Install fairseq on a GPU machine without internet, from the folder experiments/gpu/offline_wheels.sh
# filled on a machine with internet. Source it from the root of the clone, so that its exports stay:
#
#   source experiments/gpu/offline_install.sh .whl && bash experiments/gpu/run.sh OUT_DIR
#
# Installs fairseq and its missing dependencies into SITE (default ${TMPDIR:-/tmp}/adaptive-moe-site)
# with that machine's python (PYTHON, default python3), then puts SITE and the clone on
# PYTHONPATH and SITE/bin on PATH. With the prebuilt wheels (DIR/prebuilt/, built for the torch
# that DIR/prebuilt/torch.txt names) this takes seconds; where they are missing, were built for
# another torch or do not load there (system libraries differ between images), fairseq is built
# from its source distribution against that machine's torch (about 3 minutes on 16 cores). A
# second run in the same SITE only sets the paths. Log: SITE.log.
_whl=${1:-.whl}
_py=${PYTHON:-python3}
_site=${SITE:-${TMPDIR:-/tmp}/adaptive-moe-site}
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
_torch=$("$_py" -c "import torch; print(torch.__version__)" 2>/dev/null)
_loads() {  # fairseq and the compiled parts fairseq-train needs import from SITE
  PYTHONPATH=$_site "$_py" -c "import fairseq.data.data_utils_fast, fairseq.data.token_block_utils_fast" 2>/dev/null
}
_from_source() {
  rm -rf "$_site"
  "$_py" -m pip install --no-index --no-deps --no-compile --no-cache-dir --target "$_site" \
    "$_whl"/*.whl >> "$_site.log" 2>&1 &&
  # the sdist lacks the CUDA extension sources it would try to build when CUDA_HOME is set
  env -u CUDA_HOME MAX_JOBS="$(nproc)" PYTHONPATH="$_site" "$_py" -m pip install --no-index \
    --no-deps --no-build-isolation --no-cache-dir --target "$_site" \
    "$_whl"/antlr4-python3-runtime-*.tar.gz "$_whl"/fairscale-*.tar.gz \
    "$_whl"/fairseq_fixed-*.tar.gz >> "$_site.log" 2>&1
}
: > "$_site.log"
if _loads; then
  echo "offline_install: fairseq already in $_site"
elif [ -f "$_whl/prebuilt/torch.txt" ] && [ "$(cat "$_whl/prebuilt/torch.txt")" = "$_torch" ] &&
     "$_py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$_site" \
       "$_whl"/*.whl "$_whl"/prebuilt/*.whl >> "$_site.log" 2>&1 && _loads; then
  echo "offline_install: prebuilt wheels for torch $_torch"
else
  echo "offline_install: building fairseq from source for torch ${_torch:-?} (prebuilt: $(cat "$_whl/prebuilt/torch.txt" 2>/dev/null || echo none))"
  if ! { _from_source && _loads; }; then
    tail -30 "$_site.log"
    echo "offline_install: FAILED (log: $_site.log)"
    return 1 2>/dev/null || exit 1
  fi
fi
export PYTHONPATH=$_site:$_root${PYTHONPATH:+:$PYTHONPATH}
export PATH=$_site/bin:$PATH
"$_py" -c "import torch, fairseq; print('torch', torch.__version__, 'fairseq', fairseq.__version__, 'cuda', torch.cuda.is_available())"
