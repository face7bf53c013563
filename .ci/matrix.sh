#!/usr/bin/env bash
# The release matrix: for each leg of lisa_dist/versions.py MATRIX, a fresh virtual environment with
# that leg's pins (every other library at its newest release of the day, no constraints file), then
# the leg's check groups, each as one pytest run of a few real 2-rank launches:
#   hf     Trainer / SFTTrainer / accelerate under ZeRO-1/2/3, DDP, FSDP2 and one process
#   zero   the DeepSpeed ZeRO-1/2/3 distributed checks
#   fsdp2  the FSDP2 backend's distributed checks
# Each leg writes benchmarks/results/matrix/LEG.json (the releases it resolved, each group's result),
# from which `python -m lisa_dist.versions --support-table` renders docs/supported-releases.md.
#
#   .ci/matrix.sh                 # every leg
#   .ci/matrix.sh oldest newest   # some
#
# Venvs live under LISA_MATRIX_CACHE and are rebuilt on every run (a cached venv would hide a
# dependency that only an old install step provided). Each keeps its own torch extensions dir:
# DeepSpeed's ops compiled against one torch do not load in another, and a shared dir once left a
# build lock that hung later launches.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
CACHE=${LISA_MATRIX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lisa_release_matrix}
RESULTS=${LISA_MATRIX_RESULTS:-$ROOT/benchmarks/results/matrix}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore OMP_NUM_THREADS=1
mkdir -p "$CACHE" "$RESULTS"

legs=("$@")
if [ ${#legs[@]} -eq 0 ]; then
  mapfile -t legs < <("$PYTHON" -c "import runpy; print('\n'.join(runpy.run_path('lisa_dist/versions.py')['MATRIX']))")
fi

# What each check group runs (pytest arguments, relative to the repo root).
declare -A CHECKS=(
  [hf]="tests/distributed/test_hf.py"
  [zero]="tests/distributed/test_deepspeed_zero12.py tests/distributed/test_deepspeed_zero3.py"
  [fsdp2]="tests/distributed/test_fsdp2.py tests/distributed/test_golden_losses.py -k fsdp2"
)

leg_field() {  # leg_field LEG pins|checks -> "name==release ..." or "hf zero ..."
  "$PYTHON" - "$1" "$2" <<'EOF'
import runpy, sys
leg = runpy.run_path("lisa_dist/versions.py")["MATRIX"][sys.argv[1]]
if sys.argv[2] == "pins":
    print(" ".join(f"{k}=={v}" for k, v in leg["pins"].items()))
else:
    print(" ".join(leg["checks"]))
EOF
}

pip_install() {  # the system-wide pip configuration caps torch below the newest release on some machines
  local venv=$1; shift
  "$venv/bin/pip" install -q "$@" 2>/dev/null || PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install -q "$@"
}

status=0
for leg in "${legs[@]}"; do
  start=$(date +%s)
  venv=$CACHE/$leg
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  pins=$(leg_field "$leg" pins)
  torch_pin=$(tr ' ' '\n' <<<"$pins" | grep '^torch==' || true)
  # torch first and alone: with it installed, no later resolver replaces it with another build.
  pip_install "$venv" "${torch_pin:-torch==2.13.0}"
  # shellcheck disable=SC2086  # pins is a list of requirement words
  pip_install "$venv" -e '.[test]' $pins ${torch_pin:+"$torch_pin"}
  built=$(date +%s)
  echo "== matrix leg $leg: venv ready in $((built - start)) s ($pins)"
  "$venv/bin/python" -m lisa_dist.versions
  results="{}"
  for check in $(leg_field "$leg" checks); do
    t0=$(date +%s)
    log=$CACHE/$leg.$check.log
    # shellcheck disable=SC2086  # CHECKS holds pytest arguments
    if TORCH_EXTENSIONS_DIR="$venv/torch_extensions" PATH="$venv/bin:$PATH" \
        "$venv/bin/python" -m pytest -q -p no:cacheprovider ${CHECKS[$check]} 2>&1 | tee "$log"; then
      passed=true
    else
      passed=false
      status=1
    fi
    # pytest -q's last line ("12 passed, 3 skipped in 80.1s"), with or without "=" borders
    summary=$({ grep -E "[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s" "$log" || true; } | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
    results=$("$PYTHON" -c "import json,sys; r=json.loads(sys.argv[1]); r[sys.argv[2]]={'passed': sys.argv[3]=='true', \
'summary': sys.argv[4], 'seconds': int(sys.argv[5])}; print(json.dumps(r))" \
      "$results" "$check" "$passed" "$summary" "$(($(date +%s) - t0))")
    echo "== matrix leg $leg / $check: $([ $passed = true ] && echo passed || echo FAILED) ($summary)"
  done
  "$venv/bin/python" - "$leg" "$results" "$RESULTS/$leg.json" "$((built - start))" <<'EOF'
import datetime, json, platform, sys
from lisa_dist import versions
leg, checks, path, install_seconds = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
resolved = {name: row["installed"] for name, row in versions.installed_report().items()}
out = {"leg": leg, "date": datetime.date.today().isoformat(), "python": platform.python_version(),
       "why": versions.MATRIX[leg]["why"], "pins": versions.MATRIX[leg]["pins"], "resolved": resolved,
       "install_seconds": install_seconds, "checks": checks}
with open(path, "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
EOF
  echo "== matrix leg $leg: done in $(($(date +%s) - start)) s -> $RESULTS/$leg.json"
done
exit $status
