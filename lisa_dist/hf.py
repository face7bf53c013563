"""LISA for the Hugging Face Trainer, TRL's SFTTrainer and any other Trainer subclass.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LisaCallback(LisaConfig())])

A callback that flips `requires_grad` (LMFlow, axolotl, ms-swift) cannot give LISA's savings: the
optimizer, or DeepSpeed's ZeRO optimizer, already owns every parameter by the time callbacks run
(DESIGN.md sections 3 and 10). LisaCallback instead acts when Trainer prepares its model and
optimizer (`accelerator.prepare`, inside `train()`), so the engine is a LISA engine from birth:

- DeepSpeed ZeRO-1/2/3 (`TrainingArguments(deepspeed=...)`): accelerate's call to
  `deepspeed.initialize` goes to `lisa_dist.deepspeed.initialize`, with Trainer's optimizer
  (weight-decay / no-decay groups kept) or the DeepSpeed config's;
- one device: Trainer's optimizer is replaced by a `LisaOptimizer` with its class, defaults and
  groups;
- DDP (torchrun, no ZeRO): the same, and DDP handles only the always-active parameters while
  `lisa_dist.ddp.ActiveLayerGradReducer` averages the active layers' gradients, so frozen layers
  cross no wire and DDP never waits for a gradient that does not come.

Trainer's checkpoints (`save_steps`, `resume_from_checkpoint`) carry the LISA schedule (the engine's
save/load_checkpoint, or LisaOptimizer's state dict in optimizer.pt), and every Trainer log gets
`lisa/active_layers`, `lisa/switch_index`, `lisa/switch_seconds` and `lisa/optimizer_bytes`
(this rank's fp32 master + optimizer state + gradient partitions, rank 0's in the reports).
FSDP through Trainer is refused with a clear error (use `lisa_dist.fsdp.FSDPRunner`).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from . import hf_compat
from .config import LisaConfig
from .ddp import ActiveLayerGradReducer, broadcast_layers, layer_parameter_names
from .optim import LisaOptimizer

_by_model: "weakref.WeakKeyDictionary[nn.Module, LisaCallback]" = weakref.WeakKeyDictionary()
_unattached: "weakref.WeakSet[LisaCallback]" = weakref.WeakSet()


class LisaCallback(TrainerCallback):
    """Pass it in `Trainer(..., callbacks=[LisaCallback(lisa)])`; after `train()` has built the
    engine, `.engine` (DeepSpeed) or `.optimizer` (LisaOptimizer) and `.active_layers` tell the state.

    It binds to the model in `on_init_end`. Added later with `trainer.add_callback`, it has not seen
    the model: call `callback.attach(trainer.model)` before `train()`, or `train()` stops with a
    ValueError before any engine is built.
    """

    def __init__(self, lisa: LisaConfig):
        if not isinstance(lisa, LisaConfig):
            raise ValueError(f"LisaCallback(lisa=...) takes a lisa_dist.LisaConfig, got {type(lisa).__name__}")
        hf_compat.check_versions()
        hf_compat.install(_route_prepare, _extra_logs)
        self.lisa = lisa
        self.backend: Optional[str] = None
        """"deepspeed", "ddp" or "single" once the engine is built."""
        self.engine = None
        self.optimizer: Optional[LisaOptimizer] = None
        self.reducer: Optional[ActiveLayerGradReducer] = None
        _unattached.add(self)

    def attach(self, model: nn.Module) -> None:
        """Make the next `accelerator.prepare(model, optimizer)` build LISA for `model`."""
        if not isinstance(model, nn.Module):
            raise ValueError(f"LisaCallback.attach needs the model Trainer trains, got {type(model).__name__}")
        other = _by_model.get(model)
        if other is not None and other is not self:
            raise ValueError("this model already has a LisaCallback; pass one LisaCallback per Trainer")
        _by_model[model] = self
        _unattached.discard(self)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.backend is None:
            raise RuntimeError(
                "LisaCallback did not see Trainer build its optimizer: pass it in Trainer(callbacks=[...]) (or call "
                "callback.attach(trainer.model) before train()) and let Trainer create the optimizer; an optimizer "
                "passed in Trainer(optimizers=...) is supported only under DeepSpeed")

    # --- what trains now -------------------------------------------------------------------------

    @property
    def active_layers(self):
        return self.engine.lisa.active_layers if self.engine is not None else self.optimizer.active_layers

    @property
    def switch_index(self) -> int:
        return self.engine.lisa.switch_index if self.engine is not None else self.optimizer.switch_index

    def metrics(self) -> Dict[str, Any]:
        """The LISA entries added to every Trainer log."""
        if self.engine is not None:
            from .deepspeed.memory import optimizer_bytes
            lisa = self.engine.lisa
            seconds = lisa.schedule_log[-1]["seconds"] if lisa.schedule_log else 0.0
            opt_bytes = optimizer_bytes(self.engine)
        else:
            seconds = None
            b = self.optimizer.state_bytes()
            opt_bytes = b["master"] + b["optimizer_state"]
        out = {"lisa/active_layers": ",".join(str(i) for i in self.active_layers),
               "lisa/switch_index": self.switch_index, "lisa/optimizer_bytes": opt_bytes}
        if seconds is not None:
            out["lisa/switch_seconds"] = seconds
        return out


def _route_prepare(accelerator, args: Sequence[Any]):
    models = [a for a in args if isinstance(a, nn.Module)]
    has_optimizer = any(isinstance(a, torch.optim.Optimizer) or hf_compat.is_dummy_optimizer(a) for a in args)
    if not models or not has_optimizer:
        return None
    for model in models:
        callback = _by_model.get(model)
        if callback is not None:
            return functools.partial(_prepare, callback, model)
    if len(_unattached):
        raise ValueError("a LisaCallback exists but is not attached to the model being prepared (it was added with "
                         "trainer.add_callback after the Trainer was built): pass it in Trainer(callbacks=[...]) or "
                         "call callback.attach(trainer.model) before trainer.train()")
    return None


def _prepare(callback: LisaCallback, model: nn.Module, original, accelerator, args, kwargs):
    if callback.backend is not None:
        raise RuntimeError("LisaCallback already built an engine for this model; use one Trainer per model "
                           "(Trainer re-prepares only with auto_find_batch_size, which LISA does not support)")
    backend = hf_compat.backend_of(accelerator)
    if backend == "deepspeed":
        return _prepare_deepspeed(callback, original, accelerator, args, kwargs)
    if backend == "fsdp":
        raise NotImplementedError(
            "LisaCallback does not support FSDP through Trainer yet; use DeepSpeed ZeRO-3 "
            "(TrainingArguments(deepspeed=...)) or lisa_dist.fsdp.FSDPRunner / lisa-train --backend fsdp2")
    index = next((i for i, a in enumerate(args) if isinstance(a, torch.optim.Optimizer)), None)
    if index is None:
        raise ValueError("LisaCallback needs a torch optimizer next to the model in accelerator.prepare")
    lisa_optimizer = LisaOptimizer.from_optimizer(model, callback.lisa, args[index])
    if backend == "ddp":
        hf_compat.ddp_ignore_parameters(model, layer_parameter_names(model, lisa_optimizer.split))
        broadcast_layers(lisa_optimizer.split)
    args = list(args)
    args[index] = lisa_optimizer
    out = original(accelerator, *args, **kwargs)
    if backend == "ddp":
        wrapped = out[args.index(model)] if isinstance(out, (tuple, list)) else out
        callback.reducer = ActiveLayerGradReducer(lisa_optimizer.split,
                                                  lambda: hf_compat.ddp_syncs_this_backward(wrapped))
    callback.optimizer = lisa_optimizer
    callback.backend = backend
    return out


def _prepare_deepspeed(callback: LisaCallback, original, accelerator, args, kwargs):
    from . import deepspeed as lisa_deepspeed

    def initialize(**init_kwargs):
        engine, optimizer, loader, scheduler = lisa_deepspeed.initialize(**init_kwargs, lisa=callback.lisa)
        callback.engine = engine
        return engine, optimizer, loader, scheduler

    with hf_compat.deepspeed_initialize_routed_to(initialize):
        out = original(accelerator, *args, **kwargs)
    if callback.engine is None:
        raise RuntimeError("accelerate prepared a DeepSpeed model without calling deepspeed.initialize; this "
                           "accelerate release is not supported by lisa_dist.hf (see hf_compat.SUPPORTED)")
    callback.backend = "deepspeed"
    return out


def _extra_logs(trainer) -> Dict[str, Any]:
    model = getattr(trainer, "model", None)
    callback = _by_model.get(model) if isinstance(model, nn.Module) else None
    if callback is None or callback.backend is None:
        return {}
    return callback.metrics()
