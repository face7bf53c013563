"""Every private or patched transformers / accelerate access of lisa_dist.hf and lisa_dist.accelerate,
in one place, behind a version pin.

Neither library has a hook between "the optimizer exists" and "the engine is built", which is
where LISA must act (DESIGN.md section 10), so two methods are wrapped, once per process, and the
wrappers do nothing unless the model being prepared was registered by a LisaCallback:

- `accelerate.Accelerator.prepare`: Trainer calls it with (model, optimizer) after
  `create_optimizer`; under DeepSpeed accelerate's `_prepare_deepspeed` looks `deepspeed.initialize`
  up at call time (accelerator.py:2144), which `deepspeed_initialize_routed_to` swaps for the
  duration of the call; otherwise the optimizer argument is replaced before accelerate wraps it.
- `transformers.Trainer.log`: the LISA metrics join the logs before any callback (TensorBoard,
  W&B) sees them, whatever the callback order.

`zero3_weight_init_skipped` (used by lisa_dist.modeling for ZeRO-3 checkpoint loading) swaps one
transformers function for the duration of a model build.

Widen SUPPORTED only after tests/test_hf.py passes on the new releases.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Dict, Optional, Sequence

from packaging.version import Version

SUPPORTED: Dict[str, str] = {"transformers": ">=5.24,<5.25", "accelerate": ">=1.15,<1.16"}
_RANGES = {"transformers": (Version("5.24"), Version("5.25")), "accelerate": (Version("1.15"), Version("1.16"))}


def check_versions(installed: Optional[Dict[str, str]] = None) -> None:
    """Raise RuntimeError unless transformers and accelerate are in the tested ranges."""
    if installed is None:
        import accelerate
        import transformers
        installed = {"transformers": transformers.__version__, "accelerate": accelerate.__version__}
    for name, version in installed.items():
        low, high = _RANGES[name]
        if not low <= Version(Version(version).base_version) < high:
            raise RuntimeError(
                f"lisa_dist.hf is tested with {name}{SUPPORTED[name]} but {name} {version} is installed; it hooks "
                f"into Trainer/accelerate internals that change between releases. Install a supported version "
                f"(pip install '{name}{SUPPORTED[name]}') or drive lisa_dist.deepspeed.initialize / "
                "LisaOptimizer from your own loop")


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
    raise NotImplementedError(f"lisa_dist.hf does not support accelerate's {kind}; use DeepSpeed, DDP or one device")


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


def ddp_ignore_parameters(model, names: Sequence[str]) -> None:
    """Make a DistributedDataParallel built later over `model` leave these parameters alone (no
    broadcast, no gradient reduction): LISA reduces the active layers' gradients itself."""
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(names))


def ddp_syncs_this_backward(ddp_model) -> bool:
    """False inside DDP's no_sync() (a gradient-accumulation micro-step that does not reduce)."""
    return bool(ddp_model.require_backward_grad_sync)


@contextmanager
def zero3_weight_init_skipped():
    """While active, a model transformers builds under ZeRO-3 (from_config with a live
    HfDeepSpeedConfig) keeps whatever its partitions hold instead of being randomly initialised.
    transformers 5.24 initialises such a model module by module: every rank gathers the module's
    parameters whole, rank 0 initialises them and broadcasts, and each is re-partitioned
    (integrations/deepspeed.py:298, modeling_utils.py:1459). A caller that then overwrites every
    parameter from a checkpoint pays that pass over the whole model for nothing. Construction itself
    already runs under transformers' no_init_weights."""
    import transformers
    from transformers.integrations import deepspeed as hf_deepspeed

    low, high = _RANGES["transformers"]
    if not low <= Version(Version(transformers.__version__).base_version) < high:
        yield  # untested release: let it initialise (slower; the files overwrite the result all the same)
        return
    original = hf_deepspeed.initialize_weights_zero3
    hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_deepspeed.initialize_weights_zero3 = original
