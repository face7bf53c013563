#!/usr/bin/env bash
# The DeepSpeed version matrix: for each release the engine hook supports besides the one installed
# globally (lisa_dist/deepspeed/_compat.py _TESTED), a venv with that release and the ZeRO-1/2/3
# distributed checks (parity, per-rank share, frozen layers, flat memory over 100 switches, fp16
# loss scale, optimizer offload) run in it.
#
#   .ci/ds_matrix.sh                    # every release below
#   DS_MATRIX="0.17.6" .ci/ds_matrix.sh # one
#
# Each venv sees the global site-packages (torch, transformers, pytest: the same versions as the
# main suite) and shadows only deepspeed, built from its sdist without ops (DS_BUILD_OPS=0; CPU Adam
# and the shm comm op compile on first use, into the venv's own extensions dir, since the same op
# name from another release would otherwise rebuild over it). Venvs persist under
# DS_MATRIX_CACHE and are rebuilt only when missing or broken.
set -euo pipefail
cd "$(dirname "$0")/.."

# Releases the hook supports besides the global one (_compat._TESTED less 0.19.8), ZeRO-1/2/3 on
# each: 0.17.6 and 0.18.9. 0.16.9 is adapted but refused (README "Supported DeepSpeed matrix");
# run it with DS_MATRIX="0.16.9" .ci/ds_matrix.sh.
RELEASES=${DS_MATRIX:-"0.17.6 0.18.9"}
if [ -z "$RELEASES" ]; then
  echo "ds_matrix: no DeepSpeed release besides the installed one is supported yet; nothing to run"
  exit 0
fi
CACHE=${DS_MATRIX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lisa_ds_matrix}
PYTHON=${PYTHON:-python}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore OMP_NUM_THREADS=1

venv_for() {
  local version=$1 venv=$CACHE/$1
  if "$venv/bin/python" -c "import deepspeed, sys; sys.exit(deepspeed.__version__ != '$version')" 2>/dev/null; then
    return
  fi
  rm -rf "$venv"
  "$PYTHON" -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q wheel
  # --no-build-isolation: DeepSpeed's setup.py imports torch, and an isolated build would fetch one.
  DS_BUILD_OPS=0 "$venv/bin/pip" install -q --no-build-isolation "deepspeed==$version"
}

status=0
for version in $RELEASES; do
  start=$(date +%s)
  venv_for "$version"
  built=$(date +%s)
  echo "== deepspeed $version (venv $CACHE/$version, ready in $((built - start))s)"
  if TORCH_EXTENSIONS_DIR="$CACHE/$version/torch_extensions" \
      "$CACHE/$version/bin/python" -m pytest -q -p no:cacheprovider \
      tests/test_deepspeed_zero12.py tests/test_deepspeed_zero3.py; then
    echo "== deepspeed $version: passed in $(($(date +%s) - built))s"
  else
    echo "== deepspeed $version: FAILED after $(($(date +%s) - built))s"
    status=1
  fi
done
exit $status
