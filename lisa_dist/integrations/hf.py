"""LISA for the Hugging Face Trainer, TRL's SFTTrainer and any other Trainer subclass.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LisaCallback(LisaConfig())])

A callback that flips `requires_grad` (LMFlow, axolotl, ms-swift) cannot give LISA's savings: the
optimizer, or DeepSpeed's ZeRO optimizer, already owns every parameter by the time callbacks run
(docs/design.md#why-callback-lisa-saves-nothing, docs/design.md#hugging-face-trainer-facts).
LisaCallback instead acts when Trainer prepares its model and
optimizer (`accelerator.prepare`, inside `train()`), so the engine is a LISA engine from birth:

- DeepSpeed ZeRO-1/2/3 (`TrainingArguments(deepspeed=...)`): accelerate's call to
  `deepspeed.initialize` goes to `lisa_dist.backends.deepspeed.initialize`, with Trainer's optimizer
  (weight-decay / no-decay groups kept) or the DeepSpeed config's;
- one device: Trainer's optimizer is replaced by a `LisaOptimizer` with its class, defaults and
  groups;
- DDP (torchrun, no ZeRO): the same, and DDP handles only the always-active parameters while
  `lisa_dist.backends.ddp.ActiveLayerGradReducer` averages the active layers' gradients, so frozen layers
  cross no wire and DDP never waits for a gradient that does not come.
- FSDP2 (`TrainingArguments(fsdp="full_shard", fsdp_config={"fsdp_version": 2})` or an accelerate
  config with `fsdp_version: 2`): LISA shards the model the lisa_dist.backends.fsdp way (a `fully_shard` unit
  per decoder layer, then the root; bf16 weights with fp32 reduction under `bf16=True`) and Trainer's
  optimizer becomes an `FSDPLisaOptimizer` with its class, defaults and groups; Trainer's scheduler is
  built over it. FSDP1 and fsdp_config's activation_checkpointing / cpu_ram_efficient_loading are
  refused with an error (use gradient_checkpointing=True).

Trainer's checkpoints (`save_steps`, `resume_from_checkpoint`) carry the LISA schedule (the engine's
save/load_checkpoint, LisaOptimizer's state dict in optimizer.pt, or under FSDP2 a
torch.distributed.checkpoint directory `optimizer_0/` with a `lisa_checkpoint.json` sidecar), and
every Trainer log gets `lisa/active_layers`, `lisa/switch_index`, `lisa/switch_seconds` and
`lisa/optimizer_bytes` (this rank's fp32 master + optimizer state + gradient partitions, rank 0's
in the reports). The preparing itself is `lisa_dist.integrations.accelerate.LisaPrepared`, shared with
hand-written accelerate loops.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Dict, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from lisa_dist.config import LisaConfig
from lisa_dist.integrations import hf_compat
from lisa_dist.integrations.accelerate import LisaPrepared

_by_model: "weakref.WeakKeyDictionary[nn.Module, LisaCallback]" = weakref.WeakKeyDictionary()
_unattached: "weakref.WeakSet[LisaCallback]" = weakref.WeakSet()


class LisaCallback(TrainerCallback):
    """Pass it in `Trainer(..., callbacks=[LisaCallback(lisa)])`. After `train()` has built the engine,
    `.prepared` holds what LISA built (`.engine` under DeepSpeed, `.optimizer` a LisaOptimizer
    otherwise) and `.active_layers` / `.switch_index` the schedule.

    It binds to the model in `on_init_end`. Added later with `trainer.add_callback`, it has not seen
    the model: call `callback.attach(trainer.model)` before `train()`, or `train()` stops with a
    ValueError before any engine is built.
    """

    def __init__(self, lisa: LisaConfig):
        if not isinstance(lisa, LisaConfig):
            raise ValueError(f"LisaCallback(lisa=...) takes a lisa_dist.LisaConfig, got {type(lisa).__name__}")
        hf_compat.check()
        hf_compat.install(_route_prepare, _extra_logs)
        self.lisa = lisa
        self.prepared = LisaPrepared(lisa)
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
        if self.prepared.backend is None:
            raise RuntimeError(
                "LisaCallback did not see Trainer build its optimizer: pass it in Trainer(callbacks=[...]) (or call "
                "callback.attach(trainer.model) before train()) and let Trainer create the optimizer")

    @property
    def backend(self):
        return self.prepared.backend

    @property
    def engine(self):
        return self.prepared.engine

    @property
    def optimizer(self):
        return self.prepared.optimizer

    @property
    def active_layers(self):
        return self.prepared.active_layers

    @property
    def switch_index(self) -> int:
        return self.prepared.switch_index

    def metrics(self) -> Dict[str, Any]:
        """The LISA entries added to every Trainer log."""
        return self.prepared.metrics()


def _route_prepare(accelerator, args: Sequence[Any]):
    models = [a for a in args if isinstance(a, nn.Module)]
    has_optimizer = any(isinstance(a, torch.optim.Optimizer) or hf_compat.is_dummy_optimizer(a) for a in args)
    for model in models:
        callback = _by_model.get(model)
        if callback is None:
            continue
        if has_optimizer:
            return functools.partial(_prepare, callback, model)
        if hf_compat.backend_of(accelerator) == "fsdp":
            # Trainer prepares the model alone under FSDP1 (optimizer built after wrapping): refuse it
            # here, before accelerate wraps anything.
            hf_compat.fsdp2_options(accelerator)
        return None
    if not models or not has_optimizer:
        return None
    if len(_unattached):
        raise ValueError("a LisaCallback exists but is not attached to the model being prepared (it was added with "
                         "trainer.add_callback after the Trainer was built): pass it in Trainer(callbacks=[...]) or "
                         "call callback.attach(trainer.model) before trainer.train()")
    return None


def _prepare(callback: LisaCallback, model: nn.Module, original, accelerator, args, kwargs):
    return callback.prepared.run(model, original, accelerator, args, kwargs)


def _extra_logs(trainer) -> Dict[str, Any]:
    model = getattr(trainer, "model", None)
    callback = _by_model.get(model) if isinstance(model, nn.Module) else None
    if callback is None or callback.backend is None:
        return {}
    return callback.metrics()
