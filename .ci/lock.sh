#!/usr/bin/env bash
# Re-resolve the pinned tested set (constraints/tested.txt): a fresh venv, torch from the tested
# release, lisa_dist with every extra CI uses at the newest releases of the day, then pip freeze.
# Run it after widening lisa_dist/versions.py, then run CI on the result before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-2.13.0}
venv=$(mktemp -d)/venv
trap 'rm -rf "$(dirname "$venv")"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
"$PYTHON" -m venv "$venv"
"$venv/bin/pip" install -q "torch==$TORCH"
"$venv/bin/pip" install -q -e '.[test,bench]'
{
  sed -n '1,/^#   pip install/p' constraints/tested.txt
  "$venv/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -v '^lisa.dist'
} > constraints/tested.txt.new
mv constraints/tested.txt.new constraints/tested.txt
echo "constraints/tested.txt: $(grep -c '==' constraints/tested.txt) pins"
