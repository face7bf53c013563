"""The `gpu` tier: tests/scripts/gpu_checks.py on CUDA (a `cpu:gloo,cuda:nccl` group) with one rank per
visible GPU (two NCCL ranks cannot share a GPU), the same scenarios, sizes and verdicts as the checks and
flat phases of benchmarks/gpu_validate.sh. Skipped where there is no CUDA device; on a CPU the same
script is rehearsed on gloo by `benchmarks/gpu_validate.sh --rehearse OUT`."""
from __future__ import annotations

import json

import pytest
import torch

from launch_util import ROOT, deepspeed_launch, output_tail

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the gpu tier needs one")

SCRIPT = ROOT / "tests" / "scripts" / "gpu_checks.py"
CHECKS = ("zero2_fp32_overlap", "zero2_bf16", "zero3", "zero3_offload_param", "fp16_loss_scale", "resume", "fsdp2",
          "trainer", "accelerate_loop")
# The flat phase's model and length (benchmarks/gpu_validate.sh FLAT_ARGS).
FLAT_ARGS = ["--switches", "600", "--hidden", "768", "--layers", "12", "--vocab", "32000"]


def _results(tmp_path, args, timeout):
    proc = deepspeed_launch(SCRIPT, ["--out", str(tmp_path), *args], nproc=torch.cuda.device_count(),
                            timeout=timeout)
    path = tmp_path / "rank0.json"
    assert path.is_file(), f"rank 0 wrote nothing (rc {proc.returncode}):\n{output_tail(proc)}"
    results = json.loads(path.read_text())
    failed = {name: r.get("error") for name, r in results.items() if not name.startswith("_") and not r["passed"]}
    assert not failed and proc.returncode == 0, f"{failed}\n{output_tail(proc)}"
    assert results["_run"]["device"].startswith("cuda") and "cpu:gloo" in results["_run"]["process_group"]
    return results


def test_distributed_checks_on_every_gpu(tmp_path):
    results = _results(tmp_path, [], timeout=600)
    assert set(results) - {"_run"} == set(CHECKS)
    for name in ("zero2_fp32_overlap", "zero2_bf16", "zero3", "zero3_offload_param"):
        assert all(1.0 <= s <= 1.01 for s in results[name]["shares"])
        assert results[name]["device_memory"]["peak_allocated"] > 0
    shards = results["zero3_offload_param"]["offload_param"]
    assert shards["on_host"] == shards["shards"] and shards["pinned"] >= shards["pinned_at_start"] > 0
    assert results["trainer"]["fused"] and results["trainer"]["switch_index"] == 3
    assert all(d.startswith("cuda") for d in results["accelerate_loop"]["param_to_master_devices"])


def test_memory_flat_over_many_switches(tmp_path):
    flat = _results(tmp_path, ["--only", "flat_memory", *FLAT_ARGS], timeout=600)["flat_memory"]
    assert flat["switches"] == 600 and len(flat["memory"]) == 600
    assert flat["memory_kind"] == "torch.cuda.memory_allocated"
