"""In-process checks of the DeepSpeed backend: probes of DeepSpeed's internals and the configurations
`lisa_dist.deepspeed.initialize` refuses, before any process group exists."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from version_checks import forget_version_checks

from lisa_dist import LisaConfig


def _tiny():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))

def test_probes_pass_here_and_name_a_missing_private_api(monkeypatch):
    """Every private DeepSpeed attribute the hook touches is probed at first use; one that a release
    dropped stops it with an error naming the attribute and the newest release that had it."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from lisa_dist import versions
    from lisa_dist.backends.deepspeed import _compat
    forget_version_checks()
    _compat.check_deepspeed()
    forget_version_checks()
    monkeypatch.delattr(DeepSpeedZeroOptimizer, "destroy")
    with pytest.raises(versions.IncompatibleReleaseError,
                       match=r"DeepSpeedZeroOptimizer\.destroy \(last seen in deepspeed 0\.19\.8\)"):
        _compat.check_deepspeed()
    forget_version_checks()

@pytest.mark.parametrize("zero,extra,error,match", [
    ({"stage": 0}, {}, ValueError, "needs ZeRO stage 1, 2 or 3"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, {}, NotImplementedError, "NVMe"),
    ({"stage": 2}, {"no_optimizer": True}, ValueError, "add an \"optimizer\" section"),
])
def test_refused_configurations(zero, extra, error, match):
    import lisa_dist.backends.deepspeed as lds
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, **extra}
    if cfg.pop("no_optimizer", False):
        del cfg["optimizer"]
    with pytest.raises(error, match=match):
        lds.initialize(model=_tiny(), config=cfg, lisa=LisaConfig(activated_layers=1, interval_steps=2))

def test_refuses_param_group_dicts():
    import lisa_dist.backends.deepspeed as lds
    model = _tiny()
    with pytest.raises(ValueError, match="builds the optimizer's parameter groups itself"):
        lds.initialize(model=model, model_parameters=[{"params": list(model.parameters())}],
                       config={"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}},
                       lisa=LisaConfig(activated_layers=1, interval_steps=2))
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("zero,match", [
    ({"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}, "NVMe"),
    ({"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}, "NVMe"),
    ({"stage": 3, "offload_optimizer": {"device": "cpu", "super_offload": True}}, "SuperOffload"),
])
def test_refused_offload_configurations(zero, match):
    from transformers import LlamaConfig, LlamaForCausalLM

    import lisa_dist.backends.deepspeed as lds
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(NotImplementedError, match=match):
        lds.initialize(model=model, config=cfg, lisa=LisaConfig(activated_layers=1, interval_steps=2))

def test_invalidate_trace_tolerates_an_invalid_trace():
    """A rebuild before the first forward (a resume) finds the trace already invalid; DeepSpeed's
    _invalidate_trace raises on that (docs/design.md#pitfalls)."""
    from lisa_dist.backends.deepspeed import _compat

    class Coordinator:
        calls = 0

        def is_invalid_trace(self):
            return self.calls > 0

        def _invalidate_trace(self):
            if self.is_invalid_trace():
                raise RuntimeError("attempted to invalidate already invalid trace")
            self.calls += 1

    class Offload:
        coordinator = Coordinator()

        def get_param_coordinator(self):
            return self.coordinator

    class Optimizer:
        parameter_offload = Offload()

    _compat.invalidate_gather_trace(Optimizer())
    _compat.invalidate_gather_trace(Optimizer())
    assert Offload.coordinator.calls == 1
