#!/usr/bin/env bash
# One-command validation of lisa_dist on a bare GPU machine without internet (issue 12).
#
#   Where PyPI is reachable:  benchmarks/gpu_validate.sh --prepare DIR
#       collects DeepSpeed 0.19.8's source archive and the pure-Python packages a plain torch image
#       lacks (hjson, pydantic and its parts) as Python 3.12 files into DIR.
#   On the GPU machine:       benchmarks/gpu_validate.sh --from DIR [--out benchmarks/results/gpu]
#       installs from DIR (no index), then runs the phases below, each under its own timeout, writing
#       JSON + Markdown into --out as it goes (a phase that fails or times out does not stop the next).
#   On a CPU machine:         benchmarks/gpu_validate.sh --smoke --out /tmp/gpu_smoke
#       the same phases, tiny sizes, gloo: checks that the script itself works before a GPU is spent on it.
#
# Phases: env (GPU, driver, CUDA, torch, DeepSpeed) | checks (tests/scripts/gpu_checks.py on every GPU:
# parity ZeRO-2 fp32 + overlap_comm, ZeRO-2 bf16, ZeRO-3; exact fp32 share; frozen layers; FSDP2
# reduce dtype, --cpu-offload step, offload resume) | flat (1000 switches on a ~150M model: allocated
# flat, reserved bounded) | bench (~1B Llama bf16, ZeRO-2 and ZeRO-3: full vs naive toggling vs
# lisa_dist, torch.cuda memory, step, switch and first-step-after-switch times).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PREPARE="" FROM="" OUT="benchmarks/results/gpu" SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) PREPARE="$2"; shift 2 ;;
    --from) FROM="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_validate.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -n "$PREPARE" ]; then
  mkdir -p "$PREPARE"
  python3 -m pip download --no-deps --no-binary :all: -d "$PREPARE" deepspeed==0.19.8 || exit 1
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$PREPARE" \
    hjson pydantic pydantic-core annotated-types typing-inspection || exit 1
  ls -l "$PREPARE"
  exit 0
fi

export PYTHONPATH="$PWD:$PWD/tests/support${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
log() { echo "[gpu_validate $(date -u +%H:%M:%S)] $*"; }

if [ -n "$FROM" ]; then
  log "installing DeepSpeed and its missing dependencies from $FROM"
  python3 -m pip install -q --no-index --find-links "$FROM" hjson pydantic || exit 1
  DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-build-isolation --find-links "$FROM" deepspeed==0.19.8 \
    || exit 1
fi

NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ "$SMOKE" = 1 ]; then
  NPROC=2 T=300
  FLAT_ARGS=(--switches 20) BENCH_ARGS=(--steps 6 --interval 2)
elif [ "$NGPU" -ge 1 ]; then
  NPROC=$NGPU T=200
  FLAT_ARGS=(--switches 1000 --hidden 768 --layers 12 --vocab 32000)
  BENCH_ARGS=(--hidden 2048 --intermediate 5504 --layers 16 --heads 16 --kv-heads 16 --vocab 32000 --seq 1024
              --batch 4 --steps 14 --interval 4 --gamma 2)
else
  echo "gpu_validate.sh: no CUDA device visible; run with --smoke to test the script on a CPU" >&2
  exit 2
fi

log "phase env"
python3 - "$OUT" <<'PY' || true
import json, os, subprocess, sys, platform, torch
from importlib import metadata
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
out["lisa_dist_versions"] = subprocess.run([sys.executable, "-m", "lisa_dist.versions", "--json"], capture_output=True, text=True).stdout
for pkg in ("deepspeed", "transformers", "accelerate"):
    try:
        out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
        out[pkg] = None
try:
    out["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except FileNotFoundError:
    out["nvidia_smi"] = None
open(f"{sys.argv[1]}/env.json", "w").write(json.dumps(out, indent=1))
print(json.dumps(out))
PY

status=0
phase() {  # name timeout script args...: the script under the deepspeed launcher, one rank per GPU
  local name=$1 limit=$2; shift 2
  log "phase $name (timeout ${limit}s)"
  timeout "$limit" deepspeed --num_gpus "$NPROC" --master_port "$((29500 + RANDOM % 1000))" "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "{\"phase\": \"$name\", \"rc\": $rc}" > "$OUT/$name.rc.json"
  [ $rc -eq 0 ] || { status=1; log "phase $name FAILED (rc $rc); tail of $OUT/$name.log:"; tail -20 "$OUT/$name.log"; }
}
phase checks "$T" tests/scripts/gpu_checks.py --out "$OUT/checks" --only zero2_fp32_overlap,zero2_bf16,zero3,fsdp2
phase flat "$T" tests/scripts/gpu_checks.py --out "$OUT/flat" --only flat_memory "${FLAT_ARGS[@]}"
phase bench "$T" benchmarks/gpu_bench.py --out "$OUT/bench" "${BENCH_ARGS[@]}"

python3 - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
lines = ["# lisa_dist GPU validation", "", "env: " + (out / "env.json").read_text() if (out / "env.json").is_file() else ""]
for name in ("checks", "flat", "bench"):
    rc = json.loads((out / f"{name}.rc.json").read_text())["rc"] if (out / f"{name}.rc.json").is_file() else None
    lines.append(f"- {name}: {'passed' if rc == 0 else f'FAILED (rc {rc})'}")
for rank0 in sorted(out.glob("*/rank0.json")):
    lines += ["", f"## {rank0.parent.name}", "```", rank0.read_text()[:4000], "```"]
if (out / "bench" / "bench.md").is_file():
    lines += ["", (out / "bench" / "bench.md").read_text()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:8]))
PY
log "done: $OUT/summary.md"
exit $status
