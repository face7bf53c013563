"""Host memory of this process from /proc (Linux): resident bytes now or at the peak, and a way to start
a new peak. Used by the benchmarks and by tests/scripts/loading_checks.py (as benchmarks.host_memory).

lisa-train's own summary reports the lifetime peak (lisa_dist.memory.host_peak_rss_bytes, getrusage);
measuring a phase needs the resettable high-water mark VmHWM, which only /proc has."""
from __future__ import annotations

import ctypes
import gc
from pathlib import Path
from typing import Callable, Optional

import torch


def host_rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident host memory now (VmRSS) or at its peak (VmHWM), from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (not Linux?)")


def reset_peak_host_rss() -> None:
    """Start a new peak: VmHWM falls back to the current RSS (Linux `clear_refs` 5), so a later
    `host_rss_bytes("VmHWM")` is the peak of what ran in between."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rise(step: Callable[[], object], device: Optional[torch.device] = None) -> int:
    """The most memory `step()` holds at once above what was allocated when it started, in bytes: on a
    CUDA device the caching allocator's peak allocated bytes; on a CPU the process's peak resident set
    (VmHWM) above its resident set before, after handing freed heap pages back (call it inside
    lisa_dist.memory.large_host_blocks_mapped, with a threshold below the step's typical tensor, so that
    RSS follows the live tensors rather than glibc's heap)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    gc.collect()
    _malloc_trim()
    before = host_rss_bytes()
    reset_peak_host_rss()
    step()
    return host_rss_bytes("VmHWM") - before


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
