"""Golden loss lists: the first 20 steps of `lisa-train` on CPU, per backend, bit for bit.

Recorded before the layering refactor (issue 11) and kept as a test, so a change that moves code
without meaning to change numerics shows up as a changed float. Re-record deliberately with
`LISA_DIST_RECORD_GOLDEN=1 python -m pytest tests/distributed/test_golden_losses.py` and say why in the commit.
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
# --report-to rides along: its scalars must not move a loss, and only rank 0 may write events.
ARGS = ["--steps", "20", "--interval-steps", "5", "--batch-size", "4", "--max-length", "64", "--no-save",
        "--log-every", "100", "--report-to", "tensorboard"]
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
    losses = json.loads((out / "lisa_log.json").read_text())["losses"]
    _check_events(out, losses)
    return losses


def _check_events(out, losses):
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(out.rglob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].parent == out / "tensorboard", files  # rank 0 only
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (i + 1, float(np.float32(v))) for i, v in enumerate(losses)]
    lrs = [e.value for e in acc.Scalars("train/learning_rate")]
    # DeepSpeed's WarmupLR starts at its warmup_min_lr (0); every schedule reaches --lr (1e-3) by step 10.
    assert len(lrs) == len(losses) and all(0 <= v <= 1e-3 * (1 + 1e-6) for v in lrs)
    assert lrs[-1] == float(np.float32(1e-3))


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


