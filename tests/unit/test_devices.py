"""Device choice and GPU-only code paths, on CPU: each rank's device from the launcher's local rank,
the FSDP2 process-group backends, host-resident offload templates, peak-memory statistics kept
across rebuilds, clear errors when DeepSpeed cannot compile its optimizers. Where the code under test
asks CUDA or DeepSpeed's accelerator, a fake stands in for the GPU this machine lacks."""
from __future__ import annotations

import json

import pytest
import torch

from lisa_dist import devices


class FakeCuda:
    def __init__(self, monkeypatch, count=8):
        self.current, self.count = 0, count
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "set_device", self.set_device)

    def set_device(self, index):
        self.current = index


@pytest.mark.parametrize("env, expected", [
    ({"LOCAL_RANK": "3", "SLURM_LOCALID": "1"}, 3),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "2"}, 2),
    ({"SLURM_LOCALID": "5"}, 5),
    ({}, 0),
])
def test_local_rank_from_every_launcher(env, expected):
    assert devices.local_rank(env) == expected


def test_rank_device_sets_the_local_rank_device(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    assert devices.rank_device({"LOCAL_RANK": "3"}) == torch.device("cuda", 3)
    assert cuda.current == 3
    with pytest.raises(ValueError, match="local rank 9 but only 8 CUDA device"):
        devices.rank_device({"LOCAL_RANK": "9"})
    with pytest.raises(ValueError, match="LOCAL_RANK='x'"):
        devices.rank_device({"LOCAL_RANK": "x"})


def test_deepspeed_rank_device_is_local_rank_not_current_device(monkeypatch):
    from lisa_dist.backends.deepspeed.process_group import rank_device

    class FakeCudaAccelerator:  # DeepSpeed's CUDA_Accelerator API, before anyone called set_device
        current = 0

        def device_name(self, index=None):
            return "cuda" if index is None else f"cuda:{index}"

        def set_device(self, index):
            self.current = index

        def current_device_name(self):
            return f"cuda:{self.current}"

    acc = FakeCudaAccelerator()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert acc.current_device_name() == "cuda:0"  # what the engine hook used to take: rank 1 on GPU 0
    assert rank_device(acc) == torch.device("cuda", 1)
    assert acc.current_device_name() == "cuda:1"
    from deepspeed.accelerator import get_accelerator
    assert rank_device(get_accelerator()) == torch.device("cpu")


def test_fsdp_process_group_covers_cpu_tensors_on_gpus():
    from lisa_dist.backends.fsdp.runner import process_group_backend
    assert process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"


def test_fsdp_offload_resume_template_lives_on_the_host():
    """The meta device stands in for the GPU: the parked moments' template must be host memory."""
    from lisa_dist.backends.fsdp.dcp_checkpoint import _offload_template

    class Opt:
        _model = torch.nn.Linear(4, 4, device="meta")

    layout = {"0": {"weight": {"master": True, "state": {"exp_avg": [4, 4], "step": [], "x": None}}}}
    template = _offload_template(Opt(), json.loads(json.dumps(layout)))
    master, state = template[0]["weight"]
    assert master.device.type == "cpu" and master.dtype == torch.float32
    assert state["exp_avg"].device.type == "cpu" and state["step"].device.type == "cpu" and state["x"] is None


def test_zero12_rebuild_keeps_peak_memory_statistics(monkeypatch):
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero import stage_1_and_2

    from lisa_dist.backends.deepspeed import _compat

    resets = []
    monkeypatch.setattr(get_accelerator(), "reset_peak_memory_stats", lambda *a: resets.append(a))
    with _compat.keep_peak_memory_stats():
        stage_1_and_2.empty_cache()  # what DeepSpeedZeroOptimizer.__init__ calls
    assert resets == []
    stage_1_and_2.empty_cache()
    assert len(resets) == 1  # DeepSpeed's own behaviour outside a rebuild is untouched


def test_unbuildable_deepspeed_ops_get_a_clear_error():
    from deepspeed.ops.op_builder.builder import MissingCUDAException

    from lisa_dist.backends.deepspeed.op_errors import explained_op_build_failures

    cfg = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}
    with pytest.raises(RuntimeError, match='"torch_adam": true') as e:
        with explained_op_build_failures(cfg):
            raise MissingCUDAException("CUDA_HOME does not exist, unable to compile CUDA op(s)")
    assert "FusedAdam" in str(e.value) and "CUDA_HOME" in str(e.value)
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(RuntimeError, match="zero_force_ds_cpu_optimizer"):
        with explained_op_build_failures(offload):
            raise RuntimeError("Unable to JIT load the cpu_adam op due to ninja not being installed.")
    with pytest.raises(KeyError):  # anything else passes through unchanged
        with explained_op_build_failures(cfg):
            raise KeyError("lr")


def test_lisa_log_reports_step_times_and_memory(tmp_path):
    from lisa_dist.recipe.train import main

    out = tmp_path / "run"
    assert main(["--steps", "6", "--interval-steps", "2", "--batch-size", "2", "--max-length", "32", "--no-save",
                 "--output-dir", str(out)]) == 0
    log = json.loads((out / "lisa_log.json").read_text())
    assert len(log["step_seconds"]) == 6 and log["median_step_seconds"] > 0
    # Switches after steps 2 and 4: the steps right after them are timed on their own.
    assert [("first_step_seconds" in e) for e in log["schedule"]] == [False, True, True, False]
    assert log["median_first_step_after_switch_seconds"] > 0
    assert log["device_memory_all_ranks"] == [{}]  # no CUDA here
    assert log["host_peak_rss_bytes_all_ranks"][0] > 100 * 2 ** 20


def test_gpu_validate_refuses_clearly_without_a_gpu():
    import subprocess
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_validate.sh"
    proc = subprocess.run(["bash", str(script), "--out", "/tmp/lisa_gpu_validate_none"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no CUDA device visible; run with --smoke" in proc.stderr
    proc = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr
