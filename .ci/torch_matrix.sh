#!/usr/bin/env bash
# The torch matrix of the FSDP2 backend: for each torch release its gate admits besides the one CI
# installs (lisa_dist/fsdp/_compat.py TESTED_TORCH), a venv with that torch and every FSDP2 test of
# the suite that launches FSDP2 alone run in it (parity, reduce dtypes after switches, memory, offload,
# resume, golden losses, importance sampling).
#
#   .ci/torch_matrix.sh                       # every release below
#   TORCH_MATRIX="2.14.1" .ci/torch_matrix.sh # one
#
# Each venv sees the global site-packages (transformers, accelerate, DeepSpeed, pytest) and shadows
# only torch. torch 2.14.1 is a CUDA build (about 5.5 GB with its nvidia-* wheels, which pip takes
# from the local disk on this project's machines); its tests run on the CPU. Venvs persist under
# TORCH_MATRIX_CACHE and are rebuilt only when missing or broken.
set -euo pipefail
cd "$(dirname "$0")/.."

RELEASES=${TORCH_MATRIX:-"2.14.1"}
CACHE=${TORCH_MATRIX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lisa_torch_matrix}
PYTHON=${PYTHON:-python}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore OMP_NUM_THREADS=1
# Only tests whose launches run FSDP2 alone: the FSDP2 loading, gradient-traffic and Trainer launches
# also build DeepSpeed engines, and DeepSpeed is neither validated on torch 2.14 nor launched with the
# venv's interpreter (its `deepspeed` script lives with the global install).
TESTS=(tests/test_fsdp2.py tests/test_devices.py tests/test_golden_losses.py tests/test_importance.py
       tests/test_torch_gate.py)

venv_for() {
  local version=$1 venv=$CACHE/$1
  if "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
    return
  fi
  rm -rf "$venv"
  "$PYTHON" -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q "torch==$version"
}

status=0
for version in $RELEASES; do
  start=$(date +%s)
  venv_for "$version"
  built=$(date +%s)
  echo "== torch $version (venv $CACHE/$version, ready in $((built - start))s)"
  # Ops compiled against one torch do not load in another: each venv keeps its own.
  if TORCH_EXTENSIONS_DIR="$CACHE/$version/torch_extensions" "$CACHE/$version/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
      -k "fsdp or FSDP or devices or gate"; then
    echo "== torch $version: passed in $(($(date +%s) - built))s"
  else
    echo "== torch $version: FAILED after $(($(date +%s) - built))s"
    status=1
  fi
done
exit $status
