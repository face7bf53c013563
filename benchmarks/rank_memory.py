"""Peak host memory of each rank of a real `lisa-train` launch, sampled from outside.

`measure_lisa_train` starts lisa-train the way a user does (torchrun for FSDP2, the deepspeed launcher
for ZeRO) and reads every rank's /proc/<pid>/status while it runs: VmHWM (the kernel's own peak
RSS, exact whenever it is read), and RssAnon / RssFile / RssShmem, whose maxima over the samples
say what the peak was made of (anonymous memory: tensors and allocator heaps; file-backed: mapped
safetensors pages and shared libraries). Used by benchmarks/load_memory.py and
tests/distributed/test_loading.py, so the test bounds what the benchmark reports.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))

from launch_util import _tool, free_port, launch_env  # noqa: E402

HOST_BLOCK_WRAPPER = ROOT / "benchmarks" / "lisa_train_host_block.py"
FIELDS = ("VmHWM", "RssAnon", "RssFile", "RssShmem")
# What the user runs: one step, one active layer, frozen embeddings and head, fp32 weights.
USER_FLAGS = ("--steps", "1", "--activated-layers", "1", "--no-train-embeddings", "--no-train-head",
              "--dtype", "fp32", "--no-save", "--no-plots")


def process_status(pid: int) -> Optional[Dict[str, int]]:
    """FIELDS of /proc/<pid>/status in bytes; None once the process is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return out


def _descendants(pid: int) -> List[int]:
    found, stack = [], [pid]
    while stack:
        try:
            children = Path(f"/proc/{stack.pop()}/task").glob("*/children")
            kids = [int(c) for f in children for c in f.read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        found += kids
        stack += kids
    return found


def _rank_of(pid: int) -> Optional[int]:
    """RANK of a process running lisa-train itself (not torchrun or the deepspeed launcher)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        launcher = any(b"deepspeed.launcher" in c or b"torchrun" in c or c.endswith(b"/deepspeed") for c in cmd)
        if not any(c == b"lisa_dist.train" or c.endswith(HOST_BLOCK_WRAPPER.name.encode()) for c in cmd) or launcher:
            return None
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"RANK="):
                return int(entry[5:])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
        return None
    return None


def lisa_train_command(backend: str, world: int, model: Path, out_dir: Path, flags: Sequence[str] = USER_FLAGS,
                       ds_config: Optional[str] = None, host_block: bool = False) -> List[str]:
    """`torchrun -m lisa_dist.train` (fsdp2) or `deepspeed --module lisa_dist.train` (deepspeed); with
    `host_block`, HOST_BLOCK_WRAPPER instead of the module."""
    args = ["--backend", backend, "--model", str(model), "--output-dir", str(out_dir), *flags]
    if ds_config:
        args += ["--deepspeed", ds_config]
    where = ["--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    if backend == "deepspeed":
        target = [str(HOST_BLOCK_WRAPPER)] if host_block else ["--module", "lisa_dist.train"]
        return [_tool("deepspeed"), f"--num_gpus={world}", *where, *target, *args]
    target = [str(HOST_BLOCK_WRAPPER)] if host_block else ["-m", "lisa_dist.train"]
    return [_tool("torchrun"), f"--nproc_per_node={world}", *where, *target, *args]


def measure_lisa_train(backend: str, world: int, model: Path, flags: Sequence[str] = USER_FLAGS,
                       ds_config: Optional[str] = None, interval: float = 0.05, timeout: float = 600,
                       host_block: Optional[str] = None) -> Dict:
    """Launch lisa-train, sample its ranks every `interval` seconds until it exits; returns
    {"command", "seconds", "peaks": [{field: bytes} per rank], "step_seconds", "summary_peak_rss"}.
    `host_block` (bytes, or "glibc") replaces the backend's memory.map_large_host_blocks threshold.
    Raises with the output's tail when it fails."""
    out_dir = Path(tempfile.mkdtemp(prefix="lisa_rank_memory_"))
    cmd = lisa_train_command(backend, world, model, out_dir, flags, ds_config, host_block=host_block is not None)
    env = launch_env(None if host_block is None else {"LISA_BENCH_HOST_BLOCK": str(host_block)})
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: List[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    ranks: Dict[int, int] = {}
    peaks: Dict[int, Dict[str, int]] = {}
    while proc.poll() is None:
        if time.perf_counter() - start > timeout:
            proc.kill()
            break
        for pid in _descendants(proc.pid):
            if pid not in ranks:
                rank = _rank_of(pid)
                if rank is None:
                    continue
                ranks[pid] = rank
            status = process_status(pid)
            if status:
                peak = peaks.setdefault(ranks[pid], {})
                for key, value in status.items():
                    peak[key] = max(peak.get(key, 0), value)
        time.sleep(interval)
    proc.wait()
    reader.join()
    text = "".join(output)
    if proc.returncode != 0 or len(peaks) != world:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode} with {len(peaks)} of {world} ranks sampled:\n"
                           f"{text[-5000:]}")
    log = json.loads((out_dir / "lisa_log.json").read_text())
    shutil.rmtree(out_dir, ignore_errors=True)  # kept when the run fails, for its files
    return {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
            "seconds": time.perf_counter() - start, "peaks": [peaks[r] for r in sorted(peaks)],
            "step_seconds": log.get("step_seconds"), "summary_peak_rss": log.get("host_peak_rss_bytes_all_ranks")}


def extra_per_rank(big: Dict, tiny: Dict) -> Dict[str, List[int]]:
    """Per field, each rank's peak on the big checkpoint minus the same rank's on the tiny one."""
    return {k: [b[k] - t[k] for b, t in zip(big["peaks"], tiny["peaks"])] for k in FIELDS}
