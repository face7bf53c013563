"""The `gpu` tier: tests/scripts/gpu_checks.py on CUDA + NCCL with one rank per visible GPU (one is
enough: two NCCL ranks cannot share a GPU). Skipped where there is no CUDA device; on a CPU the same
script runs on gloo as phase `--smoke` of benchmarks/gpu_validate.sh."""
from __future__ import annotations

import json

import pytest
import torch
from launch_util import ROOT, deepspeed_launch, output_tail

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the gpu tier needs one")


def test_distributed_checks_on_every_gpu(tmp_path):
    n = torch.cuda.device_count()
    proc = deepspeed_launch(ROOT / "tests" / "scripts" / "gpu_checks.py", ["--out", str(tmp_path), "--switches", "1000"],
                            nproc=n, timeout=900)
    assert proc.returncode == 0, output_tail(proc)
    results = json.loads((tmp_path / "rank0.json").read_text())
    assert set(results) == {"zero2_fp32_overlap", "zero2_bf16", "zero3", "flat_memory", "fsdp2"}
    for name in ("zero2_fp32_overlap", "zero2_bf16", "zero3"):
        assert all(1.0 <= s <= 1.01 for s in results[name]["shares"])
        assert results[name]["device_memory"]["peak_allocated"] > 0
    assert results["flat_memory"]["switches"] == 1000
