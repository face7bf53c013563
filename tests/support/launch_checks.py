"""What every launcher test asserts about a lisa-train job (exit codes, clean exit, each rank's logged
schedule equal to LayerSampler's, the log file), and how it starts and stops a launcher."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest

from launch_util import ROOT
from lisa_dist.config import LisaConfig
from lisa_dist.sampling import LayerSampler

TINY_LAYERS = 8  # presets.tiny_llama_config default
STEPS, K = 6, 2
TRAIN_ARGS = ["--steps", str(STEPS), "--interval-steps", str(K), "--batch-size", "2", "--max-length", "64",
              "--no-save", "--log-every", "3"]
TIMEOUT = 300
# Not anchored to line starts: ranks share the launcher's stdout and `python -u` writes a printed line
# and its newline separately, so two ranks' lines can run together ("...[1, 7][rank 0/2] switch...").
SCHEDULE_LINE = re.compile(r"\[rank (\d+)/(\d+)\] switch (\d+)(?: at step (\d+))?: active layers \[([\d, ]*)\]")

requires_slurm = pytest.mark.skipif(shutil.which("sbatch") is None,
                                    reason="sbatch not on PATH: start a local cluster with `bash .ci/slurm_setup.sh`")


# --- helpers ---------------------------------------------------------------------------------------

Schedule = List[Tuple[int, int, Tuple[int, ...]]]


def rank_schedules(*outputs: str) -> Dict[Tuple[int, int], Schedule]:
    """(rank, world size) -> [(switch index, step, active layers)] from lisa-train's per-rank lines, in log order."""
    found: Dict[Tuple[int, int], Schedule] = {}
    for text in outputs:
        for rank, world, k, step, layers in SCHEDULE_LINE.findall(text):
            found.setdefault((int(rank), int(world)), []).append(
                (int(k), int(step or 0), tuple(int(x) for x in layers.split(",") if x.strip())))
    return found


def expected_schedule() -> Schedule:
    sampler = LayerSampler(TINY_LAYERS, LisaConfig(activated_layers=2, interval_steps=K, seed=0))
    # The switch into interval STEPS // K happens after the last step, and is logged too.
    return [(k, k * K, sampler.active_layers(k)) for k in range(STEPS // K + 1)]


def assert_job_ok(returncodes: Sequence[int], outputs: Sequence[str], world_size: int, out_dir: Path) -> None:
    text = "\n".join(outputs)
    tail = text[-8000:]
    assert all(rc == 0 for rc in returncodes), f"launcher exit codes {list(returncodes)}:\n{tail}"
    assert "terminate called" not in text, f"a rank aborted at exit:\n{tail}"
    schedules = rank_schedules(*outputs)
    ranks = [(r, world_size) for r in range(world_size)]
    assert sorted(schedules) == ranks, f"schedule lines from (rank, world size) {sorted(schedules)}:\n{tail}"
    first = schedules[ranks[0]]
    for (rank, _), schedule in schedules.items():
        assert schedule == first, f"rank {rank} logged {schedule}, rank 0 logged {first}"
    assert first == expected_schedule()
    log = json.loads((out_dir / "lisa_log.json").read_text())
    assert log["world_size"] == world_size and len(log["losses"]) == STEPS


def start(cmd: Sequence[str], env: Dict[str, str], **kwargs) -> subprocess.Popen:
    """A launcher in its own process group, so a timeout can end its ranks too, not just the launcher."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.Popen(list(cmd), cwd=ROOT, env=env, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run(cmd: Sequence[str], env: Dict[str, str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    proc = start(cmd, env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out)
