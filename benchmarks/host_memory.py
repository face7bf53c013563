"""Host memory of this process from /proc (Linux): resident bytes now or at the peak, and a way to start
a new peak. Used by the benchmarks and by tests/scripts/loading_checks.py (as benchmarks.host_memory).

lisa-train's own summary reports the lifetime peak (lisa_dist.memory.host_peak_rss_bytes, getrusage);
measuring a phase needs the resettable high-water mark VmHWM, which only /proc has."""
from __future__ import annotations

from pathlib import Path


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
