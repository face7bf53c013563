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


def test_zero12_rebuild_keeps_the_allocator_cache_and_peak_statistics(monkeypatch):
    """DeepSpeed's empty_cache(), which ZeRO-1/2's constructor calls once per param group, resets the
    peak statistics and flushes the allocator cache (a device sync and a cudaFree per cached block):
    during a rebuild it does neither. The fake stands in for DeepSpeed's CUDA accelerator."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero import stage_1_and_2

    from lisa_dist.backends.deepspeed import _compat

    calls = []
    acc = get_accelerator()
    monkeypatch.setattr(acc, "reset_peak_memory_stats", lambda *a: calls.append("reset_peak"))
    monkeypatch.setattr(acc, "empty_cache", lambda *a: calls.append("empty_cache"))
    with _compat.rebuild_memory_policy():
        for _ in range(3):  # gamma + 1 groups
            stage_1_and_2.empty_cache()
    assert calls == []
    stage_1_and_2.empty_cache()
    assert calls == ["empty_cache", "reset_peak"]  # DeepSpeed's own behaviour outside a rebuild is untouched


@pytest.mark.parametrize("nvml", [True, False])
def test_zero12_rebuild_counts_cached_blocks_as_available(monkeypatch, nvml):
    """With the cache kept, DeepSpeed's flatten-on-device check (available_memory() >= flat buffer)
    would see NVML's free memory, to which cached blocks count as used: they are added back, never
    beyond total - allocated (DeepSpeed's figure without NVML)."""
    import deepspeed.accelerator

    from lisa_dist.backends.deepspeed import _compat

    gib = 2 ** 30

    class FakeCudaAccelerator:  # DeepSpeed's CUDA_Accelerator memory API on an 80 GiB GPU
        def available_memory(self, device_index=None):
            return 20 * gib if nvml else self.total_memory() - self.memory_allocated()

        def total_memory(self, device_index=None):
            return 80 * gib

        def memory_allocated(self, device_index=None):
            return 30 * gib

        def memory_reserved(self, device_index=None):
            return 50 * gib

    acc = FakeCudaAccelerator()
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: acc)
    with _compat.rebuild_memory_policy():
        assert acc.available_memory() == (40 if nvml else 50) * gib
    assert acc.available_memory() == (20 if nvml else 50) * gib
    assert "available_memory" not in vars(acc)


def _three_linear_layers():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    return Net()


def test_offload_policy_leaves_adam_step_on_the_host():
    """state_policy="offload": a parked layer's moments come back onto the accelerator, AdamW's 0-d
    `step` stays on the host, where torch keeps it unless fused or capturable (on a GPU it would be
    read back with .item() every step, a sync per parameter). The meta device stands in for the GPU."""
    from lisa_dist import LisaConfig, LisaOptimizer

    net = _three_linear_layers()
    cfg = LisaConfig(activated_layers=1, interval_steps=1, seed=0, state_policy="offload", layers_path="layers")
    opt = LisaOptimizer(net, cfg, torch.optim.AdamW, lr=1e-3, foreach=False)
    for _ in range(8):
        for p in net.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        opt.step()
    parked = sorted(opt._offloaded)
    assert parked, "no layer was parked with optimizer state"
    layer = parked[0]
    for p in net.layers[layer].parameters():  # the layer's weights now live on the "GPU", same objects
        p.grad = None
        torch.utils.swap_tensors(p, torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
    opt._switch_to((layer,))  # the switch that brings it back
    masters = [opt._masters[p] for p in net.layers[layer].parameters()]
    state = [opt.state[m] for m in masters]
    assert all(st["exp_avg"].device.type == "meta" and st["exp_avg_sq"].device.type == "meta" for st in state)
    assert all(st["step"].device.type == "cpu" for st in state), [str(st["step"].device) for st in state]
    for m in masters:
        m.grad = torch.ones_like(m)
    opt._inner.step()  # torch's AdamW reads step with .item(): on the "GPU" that would fail (or sync)


def test_gradient_norms_cross_to_the_host_once():
    """sampling="gradient": the active layers' squared gradient norms are summed on the device and
    copied to the host once per step, not once per parameter (each copy is a device sync). The meta
    device stands in for the GPU; a dispatch mode counts (and performs, as zeros) its copies to the host."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lisa_dist import LisaConfig, LisaOptimizer

    class HostCopies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (func is torch.ops.aten._to_copy.default and args[0].device.type == "meta"
                    and torch.device(kwargs.get("device", "meta")).type == "cpu"):
                HostCopies.count += 1
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            return func(*args, **kwargs)

    with torch.device("meta"):
        net = _three_linear_layers()
    cfg = LisaConfig(activated_layers=2, interval_steps=10, seed=0, sampling="gradient", layers_path="layers")
    opt = LisaOptimizer(net, cfg, torch.optim.AdamW, lr=1e-3)
    for p in net.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    with HostCopies():
        opt.record_gradients()
    assert HostCopies.count == 1, f"{HostCopies.count} copies to the host for 4 gradients"


def test_single_runner_times_a_switch_on_the_device_clock(monkeypatch):
    """--backend single and FSDP2 time the step that switches between device synchronizations (as the
    DeepSpeed hook does), only that step. A fake CUDA device records the synchronizations."""
    from lisa_dist import LisaConfig
    from lisa_dist.backends.single import SingleRunner

    net = _three_linear_layers()
    runner = SingleRunner(net, LisaConfig(activated_layers=1, interval_steps=2, seed=0, layers_path="layers"), lr=1e-3)
    runner.device = torch.device("cuda", 0)  # the runner's view; the tensors stay on the CPU
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    per_step = []
    for _ in range(4):
        before = len(synced)
        sum(layer(torch.ones(1, 4)).sum() for layer in net.layers).backward()
        runner._clip_and_step()
        per_step.append(len(synced) - before)
    assert per_step == [0, 2, 0, 2], per_step
    assert [e["switch_index"] for e in runner.schedule_log] == [0, 1, 2]


def test_fsdp_cpu_offload_refuses_a_group_without_a_cpu_backend(monkeypatch):
    """DeepSpeed's init_distributed makes an NCCL-only group on GPUs; FSDP2's cpu_offload then fails
    deep in the first step when clipping all-reduces host norms. A fake 2-rank NCCL group stands in."""
    import torch.distributed as dist

    from lisa_dist.backends.fsdp import shard_model

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    with pytest.raises(ValueError, match=r"cpu_offload needs a process group with a CPU backend, this one has "
                                         r"'cuda:nccl'.*init_process_group\(\"cpu:gloo,cuda:nccl\"\)"):
        shard_model(_three_linear_layers(), cpu_offload=True, layers_path="layers")


def test_accelerate_prepare_puts_the_model_on_the_device_before_lisa_builds_masters(monkeypatch):
    """lisa_dist.accelerate.prepare (one device or DDP): the fp32 masters of a bf16 model must be made
    where accelerate places the model, not on the host it was built on (their gradients would then
    come from the GPU). The meta device stands in for the GPU accelerate places the model on."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from lisa_dist import LisaConfig
    from lisa_dist.accelerate import prepare, prepared_state

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        net = _three_linear_layers().to(torch.bfloat16)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        acc = Accelerator(cpu=True)
        monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("meta")))
        # Module.to() keeps the Parameter objects, as it does from the CPU to CUDA (not to meta by default).
        monkeypatch.setattr(torch.__future__, "get_swap_module_params_on_conversion", lambda: True)
        # device_placement: the model is placed; the optimizer's state-dict round trip to the device
        # (AcceleratedOptimizer) would read the "GPU" tensors back, which meta cannot do.
        model, opt = prepare(acc, net, opt, lisa=LisaConfig(activated_layers=1, interval_steps=1, layers_path="layers"),
                             device_placement=[True, False])
        masters = prepared_state(net).optimizer._masters
        assert masters and {p.device.type for p in masters} == {"meta"}
        assert all(m.device == p.device and m.dtype == torch.float32 for p, m in masters.items()), \
            sorted({f"{p.device} -> {m.device}" for p, m in masters.items()})
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


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


def test_gpu_validate_refuses_clearly_without_a_gpu(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_validate.sh"
    proc = subprocess.run(["bash", str(script), "--from", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "holds no wheels: make it with --prepare" in proc.stderr, proc.stderr
    (tmp_path / "x-1.0-py3-none-any.whl").write_bytes(b"")
    proc = subprocess.run(["bash", str(script), "--from", str(tmp_path), "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2 and "no CUDA device visible; rehearse on a CPU with --rehearse OUT" in proc.stderr, \
        proc.stderr
    proc = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr
