"""Launching test scripts through the real distributed launchers, from pytest."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port free right now; fixed ports collide with other test sessions on the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} launcher not found beside {sys.executable} or on PATH")
    return found


SUPPORT = ROOT / "tests" / "support"


def launch_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a launched test process: one intra-op thread, offline, and on PYTHONPATH
    the repository root and tests/support (the scripts import its builders and instruments by name).
    A PYTHONPATH in `extra` goes in front of those instead of replacing them."""
    extra = dict(extra or {})
    path = [extra.pop("PYTHONPATH", ""), str(ROOT), str(SUPPORT), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in path if p))
    env.update(extra)
    return env


def deepspeed_launch(script: Path, args: Sequence[str], nproc: int = 2, env: Optional[Dict[str, str]] = None,
                     timeout: float = 600) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N script args...` on this host; returns the finished process with
    `.seconds` set. The launcher exits non-zero when any rank does."""
    cmd: List[str] = [_tool("deepspeed"), f"--num_gpus={nproc}", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}", str(script), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(env), capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.perf_counter() - start
    return proc


def output_tail(proc: subprocess.CompletedProcess, chars: int = 6000) -> str:
    return (proc.stdout + proc.stderr)[-chars:]


def accelerate_launch(script: Path, args: Sequence[str], nproc: int = 2, launcher_args: Sequence[str] = (),
                      env: Optional[Dict[str, str]] = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`accelerate launch --num_processes N [launcher_args] script args...` on this host. With
    `--use_deepspeed` and a config file in launcher_args, accelerate's own DeepSpeed plugin (not
    TrainingArguments(deepspeed=...)) configures the engine."""
    cmd = [_tool("accelerate"), "launch", f"--num_processes={nproc}", "--num_machines=1",
           "--main_process_ip=127.0.0.1", f"--main_process_port={free_port()}", "--mixed_precision=no",
           "--dynamo_backend=no", *launcher_args, str(script), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(env), capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.perf_counter() - start
    return proc


def torchrun_launch(script: Path, args: Sequence[str], nproc: int = 2, env: Optional[Dict[str, str]] = None,
                    timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N script args...` on this host (a free port, not --standalone)."""
    beside = Path(sys.executable).with_name("torchrun")
    launcher = [str(beside)] if beside.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + [f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                      str(script), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(env), capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.perf_counter() - start
    return proc
