"""accelerate launch with the shipped FSDP2 config (launch/accelerate_fsdp2.yaml) runs lisa-train."""
from __future__ import annotations

import json
import subprocess
import sys

from launch_util import ROOT, free_port, launch_env

WORLD = 2


def test_accelerate_launch_config_runs_lisa_train(tmp_path):
    """launch/accelerate_fsdp2.yaml as documented in its header, with CPU offload and checkpointing."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "launch" / "accelerate_fsdp2.yaml"),
           "--num_processes", str(WORLD), "--main_process_port", str(free_port()),
           "-m", "lisa_dist.train", "--backend", "fsdp2", "--steps", "3", "--interval-steps", "1", "--batch-size", "2",
           "--cpu-offload", "--gradient-checkpointing", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    log = json.loads((out / "lisa_log.json").read_text())
    assert log["backend"] == "fsdp2" and log["world_size"] == WORLD
    assert [e["switch_index"] for e in log["schedule"]] == [0, 1, 2, 3]
    assert log["optimizer_bytes_per_rank"] < log["full_finetune_optimizer_bytes_per_rank"]
    assert (out / "model.safetensors").is_file()
