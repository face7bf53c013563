"""What every benchmark result records about where it ran: CPU/GPU, visible cores, versions."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Dict

import torch


def machine() -> Dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus_visible": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def versions() -> Dict:
    out = {"python": platform.python_version()}
    for package in ("torch", "deepspeed", "transformers", "lisa_dist"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out
