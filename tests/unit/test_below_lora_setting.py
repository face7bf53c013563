"""The recommended below-LoRA setting recorded in benchmarks/results/below_lora.json is usable as written.

Fails when:
- `lisa_config` does not build a LisaConfig, or `lisa_train_args` parse (through lisa-train's own parser)
  to a different LisaConfig;
- `planner_command`, run from the repository root as a user would, does not exit 0, does not print
  `LISA / LoRA = x`, prints a ratio above 1.0, or prints a ratio other than the one recorded;
- docs/below-lora.md stops quoting that command line.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from lisa_dist.config import LisaConfig
from lisa_dist.recipe.run_config import parse_args

ROOT = Path(__file__).resolve().parents[2]
RESULT = json.loads((ROOT / "benchmarks" / "results" / "below_lora.json").read_text())


def test_lisa_config_and_flags_agree():
    config = LisaConfig(**RESULT["lisa_config"])
    run = parse_args(["--model", "launch/configs/llama3-8b", *RESULT["lisa_train_args"]])
    assert run.lisa == config


def test_planner_command_plans_at_or_below_lora():
    words = shlex.split(RESULT["planner_command"])
    assert words[0] == "env"
    env = dict(os.environ)
    while "=" in words[1]:
        key, value = words.pop(1).split("=", 1)
        env[key] = value
    assert words[1:3] == ["python", "-m"]
    out = subprocess.run([sys.executable, *words[2:]], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = float(re.search(r"^LISA / LoRA = ([0-9.]+)", out.stdout, re.M).group(1))
    assert ratio <= 1.0
    assert ratio == RESULT["planner"]["lisa_over_lora"]


def test_docs_quote_the_command():
    assert RESULT["planner_command"] in (ROOT / "docs" / "below-lora.md").read_text()
