"""The default process group of a DeepSpeed run: which port it uses, and who started it.

ZeRO-3 loading has to start the group before the runner exists (zero.Init partitions across it);
the runner must then still destroy it at the end, so the fact is recorded here, where both look.
"""
from __future__ import annotations

import os

import torch

from lisa_dist.devices import local_rank

_STARTED_HERE = False
_SHM_RELEASED = False


def master_port() -> int:
    """The launcher's MASTER_PORT. DeepSpeed's MPI discovery overwrites MASTER_PORT with
    init_distributed's distributed_port (default 29500), so it must be passed explicitly or
    mpirun jobs ignore the port they were given and can join another job's store."""
    return int(os.environ.get("MASTER_PORT", 29500))


def ensure_initialized() -> None:
    """Start DeepSpeed's process group unless one exists, remembering that we started it."""
    global _STARTED_HERE
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   distributed_port=master_port())
        _STARTED_HERE = True
    release_shm_segments()
    from lisa_dist.backends.deepspeed import _compat
    _compat.install_gloo_all_gather_in_place()


def release_shm_segments() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment once every rank has mapped it.

    A mapping outlives its name, so the all-reduce keeps working; unlinking before the barrier
    could strand a peer still polling for the name. Called on every rank right after the group
    starts, so a run that later crashes or is killed leaves nothing in /dev/shm either."""
    global _SHM_RELEASED
    import torch.distributed as dist

    from lisa_dist.backends.deepspeed import _compat

    if _SHM_RELEASED or not dist.is_initialized():
        return
    _SHM_RELEASED = True
    name = _compat.cpu_shm_segment(dist.get_rank())
    if name is None:
        return
    dist.barrier()
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # not all ranks local: DeepSpeed made no segment
        pass


def started_here() -> bool:
    """Whether ensure_initialized created the default process group (whoever tears training down
    destroys it then)."""
    return _STARTED_HERE


def rank_device(accelerator=None) -> torch.device:
    """This rank's device on DeepSpeed's accelerator, made current.

    Taken from the launcher's local rank, not from `current_device_name()`: DeepSpeed binds NCCL to
    cuda:LOCAL_RANK without calling set_device, so before the engine exists every rank's current
    device is cuda:0, and a collective on it (the first schedule agreement) hangs or fails."""
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator
        accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    index = local_rank()
    accelerator.set_device(index)
    return torch.device(accelerator.device_name(index))


def fp16_supported(accelerator=None) -> bool:
    """Whether DeepSpeed's accelerator accepts fp16 training: the engine refuses it otherwise
    ("Type fp16 is not supported on your device"), after the model is built; its CPU accelerator
    accepts it only with oneDNN fp16 kernels."""
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator
        accelerator = get_accelerator()
    return bool(accelerator.is_fp16_supported())
