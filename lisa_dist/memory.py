"""Model-state memory per rank: the analytic floor (docs/design.md#memory-floors) and the bytes a rank holds.

Model states are weights, gradients, fp32 masters and optimizer moments; activations and
framework workspaces are not counted. Psi is every parameter, Psi_a the active ones
(always-active + gamma decoder layers), N the data-parallel world size.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Sequence

import torch

# bytes per parameter for Adam under mixed precision: fp32 master + two fp32 moments
ADAM_FP32_STATE_BYTES = 12
STAGES = ("single", "zero1", "zero2", "zero3", "fsdp2")


@dataclass(frozen=True)
class ParamCounts:
    total: int
    always: int
    per_layer: Sequence[int]

    def active(self, layers: Iterable[int]) -> int:
        return self.always + sum(self.per_layer[i] for i in layers)

    def gamma_active(self, gamma: int) -> int:
        """Psi_a for the largest gamma layers: the per-rank figure must hold for every switch."""
        return self.always + sum(sorted(self.per_layer, reverse=True)[:gamma])


def count_params(split) -> ParamCounts:
    """Counts from a lisa_dist.layers.ParamSplit (parameters outside the blocks that are frozen count in Psi only)."""
    # ZeRO-3 partitions params in place (numel() == 0 between steps); ds_numel is the full size.
    def numel(p) -> int:
        return getattr(p, "ds_numel", None) or p.numel()

    per_layer = [sum(numel(p) for _, p in layer) for layer in split.per_layer]
    always = sum(numel(p) for _, p in split.always)
    frozen = sum(numel(p) for _, p in split.frozen_outside)
    return ParamCounts(total=always + frozen + sum(per_layer), always=always, per_layer=per_layer)


def model_state_floor(stage: str, psi: int, psi_active: int, world_size: int = 1,
                      weight_bytes: int = 2) -> Dict[str, float]:
    """Per-rank bytes by category for bf16/fp16 weights (weight_bytes=2) and Adam.

    Full fine-tuning is the same formula with psi_active = psi.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    n = 1 if stage == "single" else world_size
    if n < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    # fp32 weights need no separate master: the master is the weight.
    master_bytes = 4 if weight_bytes == 2 else 0
    moments = ADAM_FP32_STATE_BYTES - 4
    sharded_weights = stage in ("zero3", "fsdp2")
    sharded_grads = stage in ("zero2", "zero3", "fsdp2")
    out = {
        "weights": weight_bytes * psi / (n if sharded_weights else 1),
        "grads": weight_bytes * psi_active / (n if sharded_grads else 1),
        "master": master_bytes * psi_active / n,
        "optimizer_state": moments * psi_active / n,
    }
    if stage == "single":
        out["master"] = master_bytes * psi_active
        out["optimizer_state"] = moments * psi_active
    out["total"] = sum(out.values())
    return out


BYTE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}


def byte_unit(n: float) -> str:
    """The largest binary unit, up to GiB, in which |n| bytes is at least 1 ("B" below 1 KiB); a
    table gives it its largest figure to print every figure in one unit that reads well."""
    return next((unit for unit in ("GiB", "MiB", "KiB") if abs(n) >= BYTE_UNITS[unit]), "B")


def format_bytes(n: float, unit: Optional[str] = None, digits: int = 1, suffix: bool = True) -> str:
    """`n` bytes as text: "1.5 MiB", "512 B". Without `unit` in byte_unit(n), whole bytes below 1 KiB;
    a fixed `unit` (a table column's, e.g. "MiB") with `digits` decimals, and `suffix=False` for the
    number alone."""
    if unit is None:
        unit = byte_unit(n)
        digits = 0 if unit == "B" else digits
    if unit not in BYTE_UNITS:
        raise ValueError(f"unknown byte unit {unit!r}; expected one of {', '.join(BYTE_UNITS)}")
    text = f"{n / BYTE_UNITS[unit]:.{digits}f}"
    return f"{text} {unit}" if suffix else text


def local_tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds for the given tensors; a DTensor (FSDP2) counts its local shard only."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 1024 ** 2  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_LARGE_HOST_BLOCK = 1024 ** 2
_process_threshold: Optional[int] = None  # set by map_large_host_blocks: the threshold for the rest of the process


def _glibc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both; musl has neither)
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def large_host_blocks_mapped(threshold: int = _LARGE_HOST_BLOCK) -> Iterator[None]:
    """While active, glibc gives every host allocation of `threshold` bytes or more its own mapping,
    so freeing it hands its pages straight back to the OS (a no-op without glibc).

    By default glibc raises its mmap threshold to the size of each mapped block freed, up to 32 MiB,
    and serves smaller blocks from its heap, which keeps their pages once freed. A loader allocating
    and freeing tensor after tensor of a few MiB (a layer's weights, whole or sliced) then peaks well
    above what it holds, by an amount that depends on the order of allocation, so differently on
    each rank (building under zero.Init: benchmarks/results/zero3_load_stages.md). Disabling the
    adaptation cannot be undone, so on exit the threshold stays at glibc's adaptive ceiling, with the
    trim threshold the adaptation pairs with it, unless `map_large_host_blocks` made the mapping
    process-wide (lisa-train), in which case it stays."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, min(threshold, _process_threshold or threshold))
    try:
        yield
    finally:
        if _process_threshold is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _process_threshold)
        else:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)
        libc.malloc_trim(0)


def map_large_host_blocks(threshold: int) -> None:
    """For the rest of the process, every host allocation of `threshold` bytes or more gets its own
    mapping (glibc; a no-op elsewhere): what `large_host_blocks_mapped` does while loading, kept
    for training, where host memory is the device's on CPUs. lisa-train calls it at its start with
    its backend's threshold (recipe/train.py).

    Left to glibc's adaptive threshold (up to 32 MiB), the blocks of the first training step that
    are below 32 MiB come from its heap: FSDP2's per-layer all-gather buffers and unsharded
    parameters, ZeRO-3's gathered parameters, activations. They are freed in another order than
    they were allocated, so the heap grows past what is live and keeps the freed pages: on the
    512 MiB checkpoint of benchmarks/load_memory.py at 2 ranks FSDP2 ranks peaked 600-800 MiB higher
    than with 1 MiB. Mapped blocks go back to the OS on free, at the cost of a page-fault pass over
    each new one, which a CPU step pays for the blocks it allocates between the threshold and 32 MiB
    (benchmarks/results/load_memory.md: the thresholds measured side by side)."""
    global _process_threshold
    libc = _glibc()
    if libc is None:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    _process_threshold = threshold


def device_memory() -> Dict[str, int]:
    """What torch's CUDA caching allocator holds on this rank's current device, in bytes: allocated
    now, reserved (what nvidia-smi shows, minus the CUDA context and NCCL's own buffers) and the peaks
    of both since the start (or the last reset_peak_memory_stats). Empty without CUDA."""
    if not torch.cuda.is_available():
        return {}
    index = torch.cuda.current_device()
    return {"allocated": torch.cuda.memory_allocated(index), "reserved": torch.cuda.memory_reserved(index),
            "peak_allocated": torch.cuda.max_memory_allocated(index),
            "peak_reserved": torch.cuda.max_memory_reserved(index)}


def host_peak_rss_bytes() -> int:
    """This process's peak resident set size (host memory), in bytes."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
