"""Every private or patched transformers / accelerate access of lisa_dist.integrations.hf and
lisa_dist.integrations.accelerate, in one place, behind a version pin.

Neither library has a hook between "the optimizer exists" and "the engine is built", which is
where LISA must act (docs/design.md#hugging-face-trainer-facts), so two methods are wrapped, once per process, and the
wrappers do nothing unless the model being prepared was registered by a LisaCallback:

- `accelerate.Accelerator.prepare`: Trainer calls it with (model, optimizer) after
  `create_optimizer`; under DeepSpeed accelerate's `_prepare_deepspeed` looks `deepspeed.initialize`
  up at call time (accelerator.py:2144), which `deepspeed_initialize_routed_to` swaps for the
  duration of the call; otherwise the optimizer argument is replaced before accelerate wraps it.
- `transformers.Trainer.log`: the LISA metrics join the logs before any callback (TensorBoard,
  W&B) sees them, whatever the callback order.
- FSDP2 (`fsdp_version: 2`): accelerate's `_prepare_fsdp2` (accelerator.py:1674-1768) shards with its
  own wrap policy and then re-points the optimizer's params by `data_ptr`, which has no entry for
  LISA's fp32 masters; so LISA shards the model itself and registers it (`register_fsdp2_model`,
  the `_models` list `_prepare_fsdp2` appends to at accelerator.py:1729). Trainer saves and loads
  the optimizer with the module globals `transformers.trainer.save_fsdp_optimizer` /
  `load_fsdp_optimizer` (trainer.py:3567, 3979), accelerate's `save_state` / `load_state` with
  `accelerate.accelerator`'s (accelerator.py:3720, 3883); both go through torch's
  `get_optimizer_state_dict`, which maps `param_groups` tensors to model FQNs and cannot name a
  master that is not a model parameter (torch/distributed/checkpoint/state_dict.py:939-966).
  `route_fsdp_optimizer_checkpoints` routes those four names: a LISA optimizer is written with
  torch.distributed.checkpoint in LISA's own layout, any other goes to accelerate.

`zero3_weight_init_skipped` (used by lisa_dist.recipe.modeling for ZeRO-3 checkpoint loading) swaps one
transformers function for the duration of a model build.

Outside the releases lisa_dist/versions.py lists, `check` warns once per library and goes on; it
refuses only when a probe of what this module touches fails.
"""
from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Dict, Optional, Sequence

from lisa_dist.backends import torch_compat
from lisa_dist.versions import IncompatibleReleaseError, Probe, check_release, missing_message, require, require_attrs


def _probes():
    import accelerate.accelerator
    import transformers.trainer

    return {
        "transformers": [
            Probe("transformers.trainer.save_fsdp_optimizer / load_fsdp_optimizer (module globals Trainer calls)",
                  lambda: callable(transformers.trainer.save_fsdp_optimizer)
                  and callable(transformers.trainer.load_fsdp_optimizer)),
        ],
        "accelerate": [
            Probe("accelerate.accelerator.save_fsdp_optimizer / load_fsdp_optimizer (module globals save_state calls)",
                  lambda: callable(accelerate.accelerator.save_fsdp_optimizer)
                  and callable(accelerate.accelerator.load_fsdp_optimizer)),
            Probe("accelerate.optimizer.AcceleratedOptimizer", lambda: isinstance(_accelerated_optimizer(), type)),
            Probe("accelerate.utils.DummyOptim", lambda: isinstance(__import__("accelerate.utils").utils.DummyOptim,
                                                                    type)),
        ],
    }


def check() -> None:
    """At lisa_dist.integrations.hf's / lisa_dist.integrations.accelerate's first use: one warning per
    library outside the tested releases (TRL too when it is loaded), and a refusal only where a probe
    of what they touch fails."""
    import accelerate
    import torch
    import transformers

    check_release("transformers", transformers.__version__)
    check_release("accelerate", accelerate.__version__)
    check_release("torch", torch.__version__)
    if "trl" in sys.modules:
        check_release("trl", getattr(sys.modules["trl"], "__version__", None))
    for library, probes in _probes().items():
        require(library, f"hf-{library}", probes)
    torch_compat.check_ddp()


def _accelerated_optimizer():
    from accelerate.optimizer import AcceleratedOptimizer
    return AcceleratedOptimizer


def prepare_did_not_build_engine() -> IncompatibleReleaseError:
    """accelerate's DeepSpeed prepare finished without looking deepspeed.initialize up, which is how
    LISA gets between Trainer's optimizer and the engine (a behaviour probe that can only run then)."""
    return IncompatibleReleaseError(missing_message("accelerate", [(
        "Accelerator.prepare building the DeepSpeed engine through deepspeed.initialize, looked up at call time "
        "(accelerate.accelerator._prepare_deepspeed)", None)]))


PrepareRoute = Callable[[Callable, Any, Sequence[Any], Dict[str, Any]], Any]
"""(original prepare, accelerator, args, kwargs) -> what prepare returns."""


def install(route_prepare: Callable[[Any, Sequence[Any]], Optional[PrepareRoute]],
            extra_logs: Callable[[Any], Dict[str, Any]]) -> None:
    """Wrap Accelerator.prepare and Trainer.log (idempotent). `route_prepare(accelerator, args)`
    returns how to run this prepare call, or None for accelerate's own; `extra_logs(trainer)` returns
    the entries to add to a Trainer log call ({} for trainers without LISA)."""
    from accelerate import Accelerator
    from transformers import Trainer

    if not getattr(Accelerator.prepare, "_lisa_dist", False):
        original_prepare = Accelerator.prepare

        @functools.wraps(original_prepare)
        def prepare(self, *args, **kwargs):
            route = route_prepare(self, args)
            if route is None:
                return original_prepare(self, *args, **kwargs)
            return route(original_prepare, self, args, kwargs)

        prepare._lisa_dist = True
        Accelerator.prepare = prepare

    if not getattr(Trainer.log, "_lisa_dist", False):
        original_log = Trainer.log

        @functools.wraps(original_log)
        def log(self, logs, *args, **kwargs):
            extra = extra_logs(self)
            if extra:
                logs.update(extra)
            return original_log(self, logs, *args, **kwargs)

        log._lisa_dist = True
        Trainer.log = log


def route_fsdp_optimizer_checkpoints(optimizer_io: Callable[[Any], Optional[Any]]) -> None:
    """Route Trainer's and accelerate's FSDP optimizer save/load (idempotent): `optimizer_io(optimizer)`
    (the unwrapped optimizer) returns an object with `save(optimizer, directory)` and
    `load(optimizer, directory)` when LISA writes that optimizer itself, else None (accelerate's)."""
    import accelerate.accelerator
    import transformers.trainer

    for module in (transformers.trainer, accelerate.accelerator):
        save, load = module.save_fsdp_optimizer, module.load_fsdp_optimizer
        if getattr(save, "_lisa_dist", False):
            continue

        def routed_save(fsdp_plugin, accelerator, optimizer, model, output_dir, optimizer_index=0, *args,
                        _original=save, **kwargs):
            inner = unwrap_optimizer(optimizer)
            io = optimizer_io(inner)
            if io is None:
                return _original(fsdp_plugin, accelerator, optimizer, model, output_dir, optimizer_index, *args,
                                 **kwargs)
            io.save(inner, os.path.join(output_dir, f"optimizer_{optimizer_index}"))

        def routed_load(fsdp_plugin, accelerator, optimizer, model, input_dir, optimizer_index=0, *args,
                        _original=load, **kwargs):
            inner = unwrap_optimizer(optimizer)
            io = optimizer_io(inner)
            if io is None:
                return _original(fsdp_plugin, accelerator, optimizer, model, input_dir, optimizer_index, *args,
                                 **kwargs)
            directory = input_dir if os.path.basename(os.path.normpath(input_dir)) == f"optimizer_{optimizer_index}" \
                else os.path.join(input_dir, f"optimizer_{optimizer_index}")
            io.load(inner, directory)

        routed_save._lisa_dist = routed_load._lisa_dist = True
        module.save_fsdp_optimizer, module.load_fsdp_optimizer = routed_save, routed_load


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer wrapper(s)."""
    from accelerate.optimizer import AcceleratedOptimizer
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def fsdp2_options(accelerator) -> Dict[str, Any]:
    """What LISA's own sharding takes from accelerate's FSDP plugin: {"bf16", "cpu_offload"}.
    Raises for FSDP1 and for the plugin options LISA's per-layer sharding does not implement."""
    from torch.distributed.fsdp import CPUOffloadPolicy
    plugin = accelerator.state.fsdp_plugin
    if getattr(plugin, "fsdp_version", 1) != 2:
        raise NotImplementedError(
            "lisa_dist supports accelerate's FSDP plugin with fsdp_version 2 only (FSDP1's flat parameters fix the "
            "trainable set at wrap time); set fsdp_config={\"fsdp_version\": 2} (or fsdp_version: 2 in the "
            "accelerate config)")
    if plugin.activation_checkpointing:
        raise ValueError("fsdp_config activation_checkpointing is not supported with LISA; use "
                         "TrainingArguments(gradient_checkpointing=True, gradient_checkpointing_kwargs="
                         "{\"use_reentrant\": False}) instead")
    if plugin.cpu_ram_efficient_loading:
        raise ValueError("fsdp_config cpu_ram_efficient_loading is not supported with LISA (every rank must hold "
                         "the weights it shards); set it to false, or use lisa-train --backend fsdp2, which loads "
                         "each rank's shards only")
    if accelerator.mixed_precision == "fp16":
        raise ValueError("LISA's FSDP2 path trains bf16 or fp32; use bf16=True (mixed_precision bf16) or neither")
    return {"bf16": accelerator.mixed_precision == "bf16",
            "cpu_offload": isinstance(plugin.cpu_offload, CPUOffloadPolicy)}


def register_fsdp2_model(accelerator, model) -> None:
    """Make an FSDP2 model LISA sharded one of the accelerator's models, as `_prepare_fsdp2` would
    (save_state, clip_grad_norm_, get_state_dict and unwrap_model look it up there)."""
    require_attrs("accelerate", accelerator, "Accelerator", ("_models",))
    if model not in accelerator._models:
        accelerator._models.append(model)
    model._is_accelerate_prepared = True


def original_prepare():
    """Accelerator.prepare as accelerate defines it (without the wrapper `install` adds)."""
    from accelerate import Accelerator
    return getattr(Accelerator.prepare, "__wrapped__", Accelerator.prepare)


def backend_of(accelerator) -> str:
    """"deepspeed", "fsdp", "ddp" or "single" for an Accelerator."""
    from accelerate.utils import DistributedType
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return "ddp"
    if kind == DistributedType.NO or accelerator.num_processes == 1:
        return "single"
    raise NotImplementedError(f"lisa_dist.integrations.hf does not support accelerate's {kind}; "
                              "use DeepSpeed, DDP or one device")


@contextmanager
def deepspeed_initialize_routed_to(fn: Callable):
    """While active, `deepspeed.initialize` is `fn` (accelerate reads the attribute at call time);
    inside `fn` it is DeepSpeed's again."""
    import deepspeed
    original = deepspeed.initialize

    def routed(*args, **kwargs):
        # fn builds the engine with the real deepspeed.initialize.
        deepspeed.initialize = original
        try:
            return fn(*args, **kwargs)
        finally:
            deepspeed.initialize = routed

    deepspeed.initialize = routed
    try:
        yield
    finally:
        deepspeed.initialize = original


def is_dummy_optimizer(obj) -> bool:
    """accelerate's placeholder for "the optimizer is in the DeepSpeed config"."""
    from accelerate.utils import DummyOptim
    return isinstance(obj, DummyOptim)


@contextmanager
def zero3_weight_init_skipped():
    """While active, a model transformers builds under ZeRO-3 (from_config with a live
    HfDeepSpeedConfig) keeps whatever its partitions hold instead of being randomly initialised
    (a release without `initialize_weights_zero3` initialises it: slower, the same after the fill).
    transformers 5.24 initialises such a model module by module: every rank gathers the module's
    parameters whole, rank 0 initialises them and broadcasts, and each is re-partitioned
    (integrations/deepspeed.py:298, modeling_utils.py:1459). A caller that then overwrites every
    parameter from a checkpoint pays that pass over the whole model for nothing. Construction itself
    already runs under transformers' no_init_weights."""
    from transformers.integrations import deepspeed as hf_deepspeed

    original = getattr(hf_deepspeed, "initialize_weights_zero3", None)
    if original is None:
        yield
        return
    hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = original
