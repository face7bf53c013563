"""Golden loss lists: the first 20 steps of `lisa-train` on CPU, per backend, bit for bit.

Recorded before the layering refactor (issue 11) and kept as a test, so a change that moves code
without meaning to change numerics shows up as a changed float. Re-record deliberately with
`LISA_DIST_RECORD_GOLDEN=1 python -m pytest tests/distributed/test_golden_losses.py` and say why in the commit.
The values are this CPU build's (torch 2.13.0+cpu): another torch or CPU may round differently.

The same launches evaluate a held-out set (--eval-data, every 10 steps): the golden losses show that
evaluating leaves training untouched, and the last eval loss of each backend (2 ranks sharing the
examples under ZeRO-2, ZeRO-3 and FSDP2) must equal tests/support/eval_reference.py's independent
computation on the exported weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eval_reference import reference_eval_loss, split_jsonl
from launch_util import ROOT, _tool, free_port, launch_env, output_tail
from lisa_dist.recipe import presets

GOLDEN = ROOT / "tests" / "golden" / "train_losses.json"
RECORD = os.environ.get("LISA_DIST_RECORD_GOLDEN") == "1"
# --report-to and --eval-data ride along: neither may move a loss, and only rank 0 may write events.
MAX_LENGTH, HELD_OUT, EVAL_STEPS = 64, 17, 10  # 17 examples on 2 ranks in batches of 4: one rank gets a filler batch
ARGS = ["--steps", "20", "--interval-steps", "5", "--batch-size", "4", "--max-length", str(MAX_LENGTH), "--no-plots",
        "--log-every", "100", "--report-to", "tensorboard", "--eval-steps", str(EVAL_STEPS), "--eval-batch-size", "4"]
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
    # Held-out: the default data's last examples (the training data is the default set, unchanged).
    held_out = out.parent / f"{out.name}_held_out.jsonl"
    split_jsonl(presets.DEFAULT_DATA, out.parent / f"{out.name}_rest.jsonl", held_out, HELD_OUT)
    proc = subprocess.run(cmd + ARGS + args + ["--eval-data", str(held_out), "--output-dir", str(out)], cwd=ROOT,
                          env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, output_tail(proc)
    log = json.loads((out / "lisa_log.json").read_text())
    _check_events(out, log["losses"], log["evals"])
    _check_eval(out, held_out, log, proc.stdout)
    return log["losses"]


def _check_eval(out, held_out, log, stdout):
    want, tokens = reference_eval_loss(out, held_out, MAX_LENGTH)
    assert [e["step"] for e in log["evals"]] == [10, 20] and log["eval_loss"] == log["evals"][-1]["eval_loss"]
    assert all(e["eval_tokens"] == tokens for e in log["evals"]), (log["evals"], tokens)
    assert abs(log["eval_loss"] - want) <= 1e-5 * want, (log["eval_loss"], want)
    for e in log["evals"]:
        assert stdout.count(f"eval step {e['step']}/20: eval_loss {e['eval_loss']:.4f} ({tokens} tokens)") == 1, stdout


def _check_events(out, losses, evals):
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
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [
        (e["step"], float(np.float32(e["eval_loss"]))) for e in evals]


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


