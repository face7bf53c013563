#!/usr/bin/env bash
# One-command validation of lisa_dist on a bare GPU machine without internet (issues 12, 23).
#
#   1. Where PyPI is reachable:  benchmarks/gpu_validate.sh --prepare DIR
#        wheels only, at most 64 MiB: DeepSpeed 0.19.8 built here as a pure-Python wheel (its ops are
#        JIT-compiled on first use), the dependencies DeepSpeed needs that the GPU image lacks (hjson,
#        pydantic and what pip resolves for it: pydantic-core, annotated-types, typing-inspection,
#        typing-extensions) for CPython 3.12 manylinux, the same compiled wheels for this machine's
#        Python when it is not 3.12 (so --rehearse can install them), and a wheel of this tree's
#        lisa_dist. torch, transformers and accelerate come from the image. DIR/MANIFEST.txt lists it all.
#   2. On this CPU:              benchmarks/gpu_validate.sh --rehearse OUT [--from DIR]
#        the device run below at smoke size, 2 ranks on gloo, in a virtual environment holding the GPU
#        image's releases (torch 2.11.0, transformers 5.17.0, accelerate 1.15.0, peft; no DeepSpeed, no
#        pydantic), kept in ${LISA_GPU_REHEARSAL_CACHE:-~/.cache/lisa_gpu_rehearsal} and rebuilt when
#        missing. Without --from it prepares a fresh DIR first. A passing rehearsal is the bar for
#        spending GPU time.
#   3. On the GPU machine:       benchmarks/gpu_validate.sh --from DIR
#        pip install --no-index --no-deps --target SITE from DIR (SITE on PYTHONPATH, SITE/bin on PATH),
#        then the phases, each under its own `timeout -k`, all within 8 minutes. Results go to
#        --work (default /tmp/lisa_gpu_validate/results) and, when $OUT is set (the device tool), are
#        packed after every phase into at most 8 files there: summary.md, env.json, checks.json,
#        bench.json, flat.json, phases.json and results.tar.gz (every log and file).
#
# Phases, most informative first: env (GPU, driver, NCCL, releases, which lisa_dist and DeepSpeed
# were imported) | checks (tests/scripts/gpu_checks.py: ZeRO-2/3 parity, ZeRO-3 offload_param, fp16
# loss scaling, resume, FSDP2, HF Trainer, accelerate loop) | bench (benchmarks/gpu_bench.py: ~1 B
# Llama bf16, ZeRO-2 and ZeRO-3, full vs naive toggling vs lisa_dist) | flat (600 ZeRO-2 switches).
# --phases env,checks reruns some (e.g. on a still-warm machine). Each phase writes its measurements
# before it judges them; a failed phase does not stop the next. Exit 0 when every phase passed,
# 1 when one failed, 2 for bad usage.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
DS_VERSION=0.19.8
IMAGE_PYTHON=3.12
BUDGET_MIB=64
CACHE=${LISA_GPU_REHEARSAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lisa_gpu_rehearsal}

PREPARE="" FROM="" REHEARSE="" WORK="" PHASES="env,checks,bench,flat"
usage() { sed -n '2,32p' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) PREPARE=${2:?--prepare needs a folder}; shift 2 ;;
    --from) FROM=${2:?--from needs the folder --prepare made}; shift 2 ;;
    --rehearse) REHEARSE=${2:?--rehearse needs an output folder}; shift 2 ;;
    --work) WORK=${2:?--work needs a folder}; shift 2 ;;
    --phases) PHASES=${2:?--phases needs a list}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_validate.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
log() { echo "[gpu_validate $(date -u +%H:%M:%S)] $*"; }
die() { echo "gpu_validate.sh: $*" >&2; exit 2; }

# --- prepare: the wheels the device run installs --------------------------------------------------

wheel_pins() {  # DIR -> name==version for each distinct wheel in DIR
  local f
  for f in "$1"/*.whl; do
    f=${f##*/}
    echo "$f" | cut -d- -f1,2 | sed 's/-/==/'
  done | sort -u
}

prepare() {
  local dir=$1 pip=("$PY" -m pip) local_py tmp
  mkdir -p "$dir" || die "cannot create $dir"
  dir=$(cd "$dir" && pwd)
  # Both wheels are built with --no-build-isolation, i.e. by this Python's setuptools.
  "$PY" -c 'import setuptools.command.bdist_wheel' 2> /dev/null || "$PY" -c 'import wheel' 2> /dev/null \
    || die "$PY cannot build wheels: pip install 'setuptools>=70.1' (or wheel) into it, or set PYTHON"
  rm -f "$dir"/*.whl "$dir/MANIFEST.txt"
  log "prepare: DeepSpeed's missing dependencies for CPython $IMAGE_PYTHON manylinux (resolved by pip)"
  # Resolved, not --no-deps per package: pydantic pins pydantic-core exactly and both need a recent
  # typing-extensions, whose version on the image is unknown.
  "${pip[@]}" download -q --only-binary=:all: --python-version "$IMAGE_PYTHON" --implementation cp \
    --abi "cp${IMAGE_PYTHON/./}" --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" hjson 'pydantic>=2,<3' || die "pip download for Python $IMAGE_PYTHON failed"
  local_py=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  if [ "$local_py" != "$IMAGE_PYTHON" ]; then
    # The same releases for this machine's Python, so --rehearse installs from this folder too: the
    # pure-Python wheels are shared, the compiled ones (pydantic-core) come once per Python.
    log "prepare: the same releases for this machine's Python $local_py (for --rehearse)"
    # shellcheck disable=SC2046  # one requirement per word
    "${pip[@]}" download -q --only-binary=:all: --no-deps -d "$dir" $(wheel_pins "$dir") \
      || die "pip download for Python $local_py failed"
  fi
  log "prepare: DeepSpeed $DS_VERSION as a pure-Python wheel (DS_BUILD_OPS=0: ops are JIT-compiled on first use)"
  tmp=$(mktemp -d)
  DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-cache-dir --no-deps --no-build-isolation -w "$tmp" "deepspeed==$DS_VERSION" \
    || die "building the DeepSpeed wheel failed (it needs torch in this Python: PYTHON=/path/to/venv/bin/python)"
  local ds_wheel="$tmp/deepspeed-$DS_VERSION-py3-none-any.whl"
  [ -f "$ds_wheel" ] || die "expected $ds_wheel, got: $(ls "$tmp")"
  "$PY" - "$ds_wheel" <<'PY' || die "the DeepSpeed wheel is not pure Python with every op left to JIT"
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
names = z.namelist()
info = z.read("deepspeed/git_version_info_installed.py").decode()
scope = {}
exec(info, scope)
prebuilt = [k for k, v in scope["installed_ops"].items() if v]
binaries = [n for n in names if n.endswith((".so", ".pyd"))]
sources = [n for n in names if n.startswith("deepspeed/ops/csrc/")]
print(f"  deepspeed wheel: prebuilt ops {prebuilt or 'none'}, binaries {binaries or 'none'}, {len(sources)} op sources")
sys.exit(1 if prebuilt or binaries or not sources else 0)
PY
  mv "$ds_wheel" "$dir/" && rm -rf "$tmp"
  local commit dirty=""
  commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')
  git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && dirty=", with uncommitted changes"
  log "prepare: lisa_dist from this tree ($commit$dirty)"
  tmp=$(mktemp -d)
  cp -r "$ROOT/setup.py" "$ROOT/README.md" "$ROOT/lisa_dist" "$tmp/" && find "$tmp" -name __pycache__ -prune -exec rm -rf {} +
  "${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$dir" "$tmp" || die "building the lisa_dist wheel failed"
  rm -rf "$tmp"
  local tree_digest
  tree_digest=$("$PY" "$ROOT/benchmarks/gpu_validate_report.py" digest "$ROOT/lisa_dist")
  {
    echo "# benchmarks/gpu_validate.sh --prepare, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# lisa_dist: commit $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo '?'), source digest $tree_digest"
    echo "# install: pip install --no-index --no-deps --target SITE --find-links DIR \$(pins below)"
    (cd "$dir" && for f in *.whl; do echo "$(du -k "$f" | cut -f1) KiB  $f"; done)
  } > "$dir/MANIFEST.txt"
  local kib
  kib=$(du -sk "$dir" | cut -f1)
  cat "$dir/MANIFEST.txt"
  log "prepare: $dir holds $((kib / 1024)) MiB ($kib KiB) in $(find "$dir" -name '*.whl' | wc -l) wheels"
  [ "$kib" -le $((BUDGET_MIB * 1024)) ] || die "$dir is over $BUDGET_MIB MiB"
}

# --- the rehearsal's virtual environment: the GPU image's releases -----------------------------

# What the GPU image has that lisa_dist, DeepSpeed and the checks need (torch's CUDA build runs on a
# CPU). numpy: the image has 2.5.2, which needs Python >= 3.12; this Python takes the newest 2.4.
REHEARSAL_PINS=(transformers==5.17.0 accelerate==1.15.0 huggingface_hub==1.33.0 safetensors==0.8.0
                tokenizers==0.23.2 'peft>=0.17,<0.22' 'numpy<2.5' ninja msgpack py-cpuinfo einops psutil tqdm
                nvidia-ml-py packaging pyyaml)
# Absent from the image: the prepared folder must bring them (typer pulls pydantic in here).
IMAGE_LACKS=(deepspeed pydantic pydantic-core annotated-types typing-inspection hjson)
TORCH_WHEELS=${LISA_TORCH_WHEELS:-/work/dl/torch-2.11.0}

rehearsal_venv() {
  local venv=$CACHE/venv stamp
  stamp="torch==2.11.0 ${REHEARSAL_PINS[*]} -${IMAGE_LACKS[*]}"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.lisa_stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  log "rehearsal venv: building $venv (the GPU image's releases)"
  rm -rf "$venv"
  mkdir -p "$CACHE" || die "cannot create $CACHE"
  "$PY" -m venv "$venv" || die "cannot create $venv"
  local torch_src=(--find-links "$TORCH_WHEELS")
  [ -d "$TORCH_WHEELS" ] || torch_src=()
  # torch first and alone, then the rest with torch pinned, so no resolver swaps the build.
  "$venv/bin/pip" install -q "${torch_src[@]}" torch==2.11.0 || die "installing torch 2.11.0 failed"
  "$venv/bin/pip" install -q "${torch_src[@]}" torch==2.11.0 "${REHEARSAL_PINS[@]}" || die "installing the image's releases failed"
  "$venv/bin/pip" uninstall -q -y "${IMAGE_LACKS[@]}" 2>/dev/null
  echo "$stamp" > "$venv/.lisa_stamp"
}

# --- the device run ------------------------------------------------------------------------------

RESULTS="" SITE="" START=0 DEADLINE=0 STATUS=0

publish() {  # refresh summary.md and pack RESULTS into $OUT (at most 8 files, each <= 16 MiB)
  "$PY" "$ROOT/benchmarks/gpu_validate_report.py" summary "$RESULTS" > /dev/null 2>&1
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  local f
  for f in "$RESULTS"/*.log; do  # logs are capped so the archive stays far below 16 MiB
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 4194304 ] && { tail -c 4194304 "$f" > "$f.tail" && mv "$f.tail" "$f"; }
  done
  cp "$RESULTS/summary.md" "$OUT/summary.md" 2>/dev/null
  cp "$RESULTS/phases.json" "$OUT/phases.json" 2>/dev/null
  cp "$RESULTS/env.json" "$OUT/env.json" 2>/dev/null
  cp "$RESULTS/checks/rank0.json" "$OUT/checks.json" 2>/dev/null
  cp "$RESULTS/bench/bench.json" "$OUT/bench.json" 2>/dev/null
  cp "$RESULTS/flat/rank0.json" "$OUT/flat.json" 2>/dev/null
  tar czf "$OUT/results.tar.gz.part" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" \
    && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

record() {  # name rc milliseconds limit [skipped]
  "$PY" - "$RESULTS/phases.json" "$@" <<'PY'
import json, sys
path, name, rc, ms, limit = sys.argv[1:6]
try:
    phases = json.load(open(path))
except (OSError, ValueError):
    phases = {}
phases[name] = {"rc": int(rc), "seconds": int(ms) / 1000, "limit": int(limit), "skipped": len(sys.argv) > 6}
json.dump(phases, open(path, "w"), indent=1)
PY
}

phase() {  # name limit command...: run under `timeout -k`, within what is left of the run's budget
  local name=$1 limit=$2 left rc t0
  shift 2
  case ",$PHASES," in *",$name,"*) ;; *) return 0 ;; esac
  left=$((DEADLINE - $(date +%s) - 5))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 20 ]; then
    log "phase $name skipped: the run's time budget is spent"
    record "$name" 124 0 "$limit" skipped
    STATUS=1
    publish
    return 0
  fi
  log "phase $name (limit ${limit}s)"
  t0=$(now_ms)
  timeout -k 15 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  rc=$?
  record "$name" "$rc" $(($(now_ms) - t0)) "$limit"
  if [ "$rc" -ne 0 ]; then
    STATUS=1
    log "phase $name FAILED (rc $rc); end of $name.log:"
    tail -25 "$RESULTS/$name.log"
  fi
  grep -h "^\[gpu_checks\|^gpu_checks:" "$RESULTS/$name.log" 2>/dev/null
  publish
}

launcher() {  # DeepSpeed's launcher, one rank per GPU (2 gloo ranks in a rehearsal), on a free port
  local port
  port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  echo deepspeed --num_gpus "$NPROC" --master_addr 127.0.0.1 --master_port "$port"
}

device_run() {  # FROM [rehearse]
  local from=$1 rehearse=${2:-}
  if [ ! -d "$from" ] || ! ls "$from"/*.whl > /dev/null 2>&1; then
    die "$from holds no wheels: make it with --prepare $from"
  fi
  from=$(cd "$from" && pwd)
  WORK=${WORK:-/tmp/lisa_gpu_validate}
  RESULTS=$WORK/results SITE=$WORK/site
  rm -rf "$WORK"
  mkdir -p "$RESULTS" || die "cannot create $WORK"
  START=$(date +%s)
  if [ -n "$rehearse" ]; then
    DEADLINE=$((START + ${LISA_GPU_REHEARSAL_BUDGET:-2400}))
    NPROC=2
    # Smoke sizes; CPU limits (the first DeepSpeed launch in a fresh extensions dir compiles its CPU ops).
    LIMITS=(120 900 600 600)
    BENCH_ARGS=(--steps 6 --interval 2)
    FLAT_ARGS=(--switches 40)
    export TORCH_EXTENSIONS_DIR=$CACHE/torch_extensions CUDA_VISIBLE_DEVICES=""
  else
    DEADLINE=$((START + 480))  # 8 minutes, install included; the device tool allows 10 per command
    NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    [ "$NPROC" -ge 1 ] || die "no CUDA device visible; rehearse on a CPU with --rehearse OUT"
    LIMITS=(60 150 170 100)
    BENCH_ARGS=(--hidden 2048 --intermediate 5504 --layers 16 --heads 16 --kv-heads 16 --vocab 32000 --seq 1024
                --batch 4 --steps 14 --interval 4 --gamma 2)
    FLAT_ARGS=(--switches 600 --hidden 768 --layers 12 --vocab 32000)
    export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
  fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  echo "{}" > "$RESULTS/phases.json"

  log "install: $(wheel_pins "$from" | tr '\n' ' ')"
  local t0 rc
  t0=$(now_ms)
  # --find-links picks, per pinned name, the wheel built for this Python (DIR may hold several).
  # shellcheck disable=SC2046  # one requirement per word
  "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --target "$SITE" \
    --find-links "$from" $(wheel_pins "$from") > "$RESULTS/install.log" 2>&1
  rc=$?
  record install "$rc" $(($(now_ms) - t0)) 0
  if [ $rc -ne 0 ]; then
    tail -20 "$RESULTS/install.log"
    publish
    log "installing from $from failed (see install.log)"
    exit 1
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
  command -v deepspeed > /dev/null || die "no deepspeed launcher in $SITE/bin after the install"
  local want have
  want=$(sed -n 's/.*source digest \([0-9a-f]*\).*/\1/p' "$from/MANIFEST.txt" 2>/dev/null)
  have=$("$PY" "$ROOT/benchmarks/gpu_validate_report.py" digest "$ROOT/lisa_dist")
  if [ "$want" != "$have" ]; then
    if [ -n "$rehearse" ]; then
      die "the lisa_dist wheel in $from (digest ${want:-?}) is not this tree's ($have): run --prepare $from again"
    fi
    log "WARNING: the lisa_dist wheel in $from (digest ${want:-?}) differs from this tree ($have); the wheel runs"
  fi

  # shellcheck disable=SC2046  # launcher prints the launcher's words
  phase env "${LIMITS[0]}" "$PY" "$ROOT/benchmarks/gpu_validate_report.py" env "$RESULTS"
  # shellcheck disable=SC2046
  phase checks "${LIMITS[1]}" $(launcher) "$ROOT/tests/scripts/gpu_checks.py" --out "$RESULTS/checks"
  # shellcheck disable=SC2046
  phase bench "${LIMITS[2]}" $(launcher) "$ROOT/benchmarks/gpu_bench.py" --out "$RESULTS/bench" "${BENCH_ARGS[@]}"
  # shellcheck disable=SC2046
  phase flat "${LIMITS[3]}" $(launcher) "$ROOT/tests/scripts/gpu_checks.py" --out "$RESULTS/flat" \
    --only flat_memory "${FLAT_ARGS[@]}"
  publish
  cat "$RESULTS/summary.md"
  log "done in $(($(date +%s) - START)) s: $RESULTS${OUT:+, packed into $OUT ($(find "$OUT" -type f | wc -l) files)}"
  exit $STATUS
}

if [ -n "$PREPARE" ]; then
  prepare "$PREPARE"
  exit 0
fi
if [ -n "$REHEARSE" ]; then
  mkdir -p "$REHEARSE" && OUT=$(cd "$REHEARSE" && pwd)
  [ -z "$(ls -A "$OUT")" ] || die "$OUT is not empty: rehearse into a fresh folder (the device tool's \$OUT starts empty)"
  export OUT
  WORK=${WORK:-/tmp/lisa_gpu_rehearsal}
  if [ -z "$FROM" ]; then  # prepared with this machine's Python (PYTHON), before the venv goes on PATH
    FROM=$WORK.prepare
    prepare "$FROM"
  fi
  rehearsal_venv
  PY=$CACHE/venv/bin/python
  export PATH="$CACHE/venv/bin:$PATH"
  device_run "$FROM" rehearse
fi
[ -n "$FROM" ] || { usage >&2; die "say --prepare DIR, --rehearse OUT or --from DIR"; }
device_run "$FROM"
