"""Golden loss lists: the first 20 steps of `lisa-train` on CPU, per backend, bit for bit.

Recorded before the layering refactor (issue 11) and kept as a test, so a change that moves code
without meaning to change numerics shows up as a changed float. Re-record deliberately with
`LISA_DIST_RECORD_GOLDEN=1 python -m pytest tests/test_golden_losses.py` and say why in the commit.
The values are this CPU build's (torch 2.13.0+cpu): another torch or CPU may round differently.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch_util import ROOT, _tool, free_port, launch_env, output_tail

GOLDEN = ROOT / "tests" / "golden" / "train_losses.json"
RECORD = os.environ.get("LISA_DIST_RECORD_GOLDEN") == "1"
ARGS = ["--steps", "20", "--interval-steps", "5", "--batch-size", "4", "--max-length", "64", "--no-save",
        "--log-every", "100"]
RUNS = {
    "single": ([], ["--backend", "single"]),
    "zero2": (["deepspeed"], ["--backend", "deepspeed", "--deepspeed", "ds_configs/zero2.json"]),
    "zero3": (["deepspeed"], ["--backend", "deepspeed", "--deepspeed", "ds_configs/zero3.json"]),
    "fsdp2": (["torchrun"], ["--backend", "fsdp2"]),
}


def _launch(launcher, args, out):
    if not launcher:
        cmd = [sys.executable, "-m", "lisa_dist.train"]
    elif launcher[0] == "deepspeed":
        cmd = [_tool("deepspeed"), "--num_gpus=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "--module", "lisa_dist.train"]
    else:
        cmd = [_tool("torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "lisa_dist.train"]
    proc = subprocess.run(cmd + ARGS + args + ["--output-dir", str(out)], cwd=ROOT, env=launch_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, output_tail(proc)
    return json.loads((out / "lisa_log.json").read_text())["losses"]


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(RUNS))
def test_losses_match_golden(name, tmp_path):
    launcher, args = RUNS[name]
    losses = _launch(launcher, args, tmp_path / name)
    assert len(losses) == 20
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    if RECORD:
        golden[name] = losses
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
        return
    assert name in golden, f"no golden losses for {name}; record them with LISA_DIST_RECORD_GOLDEN=1"
    diffs = [(i, a, b) for i, (a, b) in enumerate(zip(losses, golden[name])) if a != b]
    assert not diffs, f"{name}: losses differ from the golden list at (step, now, golden) {diffs[:5]}"


@pytest.mark.unit
def test_distributed_backends_start_from_the_same_weights():
    """The 2-rank runs see the same first batch, so equal weights give an equal first loss: the
    presets' init is the single-process one on every backend (ZeRO-3 included, not zero.Init's)."""
    golden = json.loads(GOLDEN.read_text())
    assert golden["zero2"][0] == golden["zero3"][0] == golden["fsdp2"][0]
