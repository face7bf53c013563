"""Which device each rank trains on, decided in one place.

Launchers tell a process its slot on the node through an environment variable, not through the
CUDA current device: the deepspeed launcher and torchrun set LOCAL_RANK, Open MPI
OMPI_COMM_WORLD_LOCAL_RANK, Slurm's srun SLURM_LOCALID. NCCL binds a process group to
`cuda:LOCAL_RANK` without making it current, so anything that asks for "the current device" before
someone calls set_device gets cuda:0 on every rank (and the first collective on it hangs or fails).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch

LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def local_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's index on its node, from the first launcher variable that is set (0 if none)."""
    for name in LOCAL_RANK_VARS:
        raw = env.get(name, "").strip()
        if raw:
            if not raw.isdigit():
                raise ValueError(f"{name}={raw!r} is not a non-negative integer; the launcher sets it, unset it "
                                 "if you set it by hand")
            return int(raw)
    return 0


def rank_device(env: Mapping[str, str] = os.environ) -> torch.device:
    """This rank's CUDA device (made current) when CUDA is there, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = local_rank(env)
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"local rank {index} but only {count} CUDA device(s) visible; start at most {count} "
                         "processes per node (--num_gpus / --nproc_per_node) or fix CUDA_VISIBLE_DEVICES")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on `device` (nothing to wait for on a CPU). Host clocks around GPU
    work measure only the launches otherwise: the work itself lands in whatever is timed next."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
