"""LISA for hand-written accelerate loops: `prepare(accelerator, *objects, lisa=...)`.

    model, optimizer, loader, scheduler = lisa_dist.integrations.accelerate.prepare(
        accelerator, model, optimizer, loader, scheduler, lisa=LisaConfig(activated_layers=2))

returns what `accelerator.prepare` returns, with LISA inside: under a DeepSpeed plugin the engine
is built by `lisa_dist.backends.deepspeed.initialize` (the optimizer's hyper-parameter groups are kept, a
torch LR scheduler built over it follows every switch); on one device or under DDP the optimizer
becomes a `LisaOptimizer` of the same class, defaults and groups, and a torch LR scheduler passed
along is re-bound to it (DDP then reduces only the always-active parameters and `lisa_dist.backends.ddp`
the active layers). Under an FSDP plugin with `fsdp_version: 2` the model is sharded the
lisa_dist.backends.fsdp way (one `fully_shard` unit per decoder layer, then the root; bf16 weights with fp32
reduction under mixed_precision bf16) instead of by accelerate's wrap policy, the optimizer becomes
an `FSDPLisaOptimizer` (fp32 DTensor masters and moments for the active set only) with the same
class, defaults and groups, and schedulers are re-bound to it; FSDP1 is refused. `LisaPrepared`
(what `prepared_state(model)` returns) tells the active layers, switch index and optimizer bytes.
"""
from __future__ import annotations

import inspect
import weakref
from types import SimpleNamespace
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from lisa_dist import vocab_rows
from lisa_dist.backends import torch_compat
from lisa_dist.backends.ddp import ActiveLayerGradReducer, broadcast_layers, layer_parameter_names
from lisa_dist.config import LisaConfig
from lisa_dist.integrations import hf_compat
from lisa_dist.optim import LisaOptimizer

_prepared: "weakref.WeakKeyDictionary[nn.Module, LisaPrepared]" = weakref.WeakKeyDictionary()

PREPARED_FOR_EVALUATION_FIRST = (
    "the model was prepared for evaluation before LISA built its training setup (Trainer.evaluate() before "
    "train() does that): under {backend}, accelerate {what}, so train() could not train it with LISA. Evaluate "
    "the starting model inside train() with TrainingArguments(eval_on_start=True), which runs on LISA's engine, "
    "or call evaluate() after train(); in a hand-written loop, prepare the model together with its optimizer first")
"""Why an evaluation-only prepare of a LISA model before training is refused (DeepSpeed ZeRO-3, FSDP2, DDP)."""


class LisaPrepared:
    """What LISA built for one model: `.backend` ("deepspeed", "fsdp2", "ddp", "single"), `.engine`
    (DeepSpeed) or `.optimizer` (LisaOptimizer; an FSDPLisaOptimizer under FSDP2), and the schedule."""

    def __init__(self, lisa: LisaConfig):
        if not isinstance(lisa, LisaConfig):
            raise ValueError(f"lisa must be a lisa_dist.LisaConfig, got {type(lisa).__name__}")
        if lisa.embedding_update == "rows":
            raise vocab_rows.unsupported(
                "LisaCallback (HF Trainer) or lisa_dist.accelerate.prepare",
                "their saves write the model's state as it is, which would drop what the rows learned (the "
                "deltas must be merged into the weights: lisa_dist.vocab_rows.merged_state_dict)")
        self.lisa = lisa
        self.backend: Optional[str] = None
        self.engine = None
        self.optimizer: Optional[LisaOptimizer] = None
        self.reducer: Optional[ActiveLayerGradReducer] = None

    @property
    def active_layers(self):
        return self.engine.lisa.active_layers if self.engine is not None else self.optimizer.active_layers

    @property
    def switch_index(self) -> int:
        return self.engine.lisa.switch_index if self.engine is not None else self.optimizer.switch_index

    def metrics(self) -> Dict[str, Any]:
        """Active layers, switch index, last switch time (DeepSpeed) and this rank's optimizer bytes
        (fp32 masters that are not the weights + optimizer state, + gradient partitions under ZeRO)."""
        out: Dict[str, Any] = {"lisa/active_layers": ",".join(str(i) for i in self.active_layers),
                               "lisa/switch_index": self.switch_index}
        if self.engine is not None:
            from lisa_dist.backends.deepspeed.state_bytes import optimizer_bytes
            log = self.engine.lisa.schedule_log
            out["lisa/optimizer_bytes"] = optimizer_bytes(self.engine)
            out["lisa/switch_seconds"] = log[-1]["seconds"] if log else 0.0
        else:
            b = self.optimizer.state_bytes()
            out["lisa/optimizer_bytes"] = b["master"] + b["optimizer_state"]
        return out

    def run(self, model: nn.Module, original_prepare, accelerator, args: Sequence[Any], kwargs: Dict[str, Any]):
        """accelerator.prepare(*args, **kwargs) (`original_prepare` unbound) with LISA for `model`."""
        if self.backend is not None:
            raise RuntimeError("LISA already built an engine for this model; prepare each model once (Trainer "
                               "re-prepares only with auto_find_batch_size, which LISA does not support)")
        backend = hf_compat.backend_of(accelerator)
        if backend == "fsdp":
            out = self._run_fsdp2(model, original_prepare, accelerator, args, kwargs)
            backend = "fsdp2"
        elif backend == "deepspeed":
            out = self._run_deepspeed(original_prepare, accelerator, args, kwargs)
        else:
            out = self._run_plain(backend, model, original_prepare, accelerator, args, kwargs)
        self.backend = backend
        _prepared[model] = self
        return out

    def _run_deepspeed(self, original_prepare, accelerator, args, kwargs):
        from lisa_dist.backends import deepspeed as lisa_deepspeed
        optimizer = next((a for a in args if isinstance(a, torch.optim.Optimizer)), None)
        # accelerate keeps torch schedulers out of DeepSpeed and steps them itself.
        schedulers = [a for a in args if isinstance(a, torch.optim.lr_scheduler.LRScheduler)
                      and getattr(a, "optimizer", None) is optimizer and optimizer is not None]

        def initialize(**init_kwargs):
            engine, ds_optimizer, loader, scheduler = lisa_deepspeed.initialize(
                **init_kwargs, lisa=self.lisa, other_schedulers=schedulers)
            self.engine = engine
            return engine, ds_optimizer, loader, scheduler

        with hf_compat.deepspeed_initialize_routed_to(initialize):
            out = original_prepare(accelerator, *args, **kwargs)
        if self.engine is None:
            raise hf_compat.prepare_did_not_build_engine()
        return out

    def _run_plain(self, backend, model, original_prepare, accelerator, args, kwargs):
        index = next((i for i, a in enumerate(args) if isinstance(a, torch.optim.Optimizer)), None)
        if index is None:
            raise ValueError("LISA needs the model's torch optimizer in the same prepare call as the model "
                             "(prepare(model, optimizer, ...)): it becomes a LisaOptimizer")
        # On the device first, as accelerate would place it: LISA's fp32 masters are made from the
        # weights where they are, and DDP's broadcast below runs on the device's backend (NCCL has none
        # for host tensors).
        placement = kwargs.get("device_placement")
        at = next(i for i, a in enumerate(args) if a is model)
        place = accelerator.device_placement if placement is None else placement[at]
        if place and _movable(model, accelerator):
            model.to(accelerator.device)
        optimizer = LisaOptimizer.from_optimizer(model, self.lisa, args[index])
        for scheduler in (a for a in args if isinstance(a, torch.optim.lr_scheduler.LRScheduler)):
            optimizer.adopt_scheduler(scheduler, args[index])
        if backend == "ddp":
            torch_compat.ddp_ignore_parameters(model, layer_parameter_names(model, optimizer.split))
            broadcast_layers(optimizer.split)
        args = list(args)
        args[index] = optimizer
        out = original_prepare(accelerator, *args, **kwargs)
        if backend == "ddp":
            wrapped = out[next(i for i, a in enumerate(args) if a is model)] if isinstance(out, tuple) else out
            if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
                # accelerate's prepare_model(evaluation_mode=True) marks the model prepared without wrapping it,
                # and never wraps it later: the always-active parameters' gradients would not be averaged.
                raise ValueError(PREPARED_FOR_EVALUATION_FIRST.format(
                    backend="DDP", what="marked it prepared without DistributedDataParallel and will not wrap it now"))
            self.reducer = ActiveLayerGradReducer(optimizer.split,
                                                  lambda: torch_compat.ddp_syncs_this_backward(wrapped))
        self.optimizer = optimizer
        return out

    def _run_fsdp2(self, model, original_prepare, accelerator, args, kwargs):
        # accelerate's own FSDP2 prepare shards by its wrap policy and re-points the optimizer at the
        # sharded params by data_ptr, which LISA's fp32 masters do not have (hf_compat docstring):
        # shard here, hand accelerate only what it can prepare as usual (loaders, schedulers).
        from lisa_dist.backends.fsdp import FSDPLisaOptimizer, shard_model
        options = hf_compat.fsdp2_options(accelerator)
        index = next((i for i, a in enumerate(args) if isinstance(a, torch.optim.Optimizer)), None)
        if index is None:
            raise ValueError("LISA needs the model's torch optimizer in the same prepare call as the model "
                             "(prepare(model, optimizer, ...)): it becomes an FSDPLisaOptimizer")
        user_optimizer = args[index]
        if any(len(st) for st in user_optimizer.state.values()):
            raise ValueError("prepare needs an optimizer that has not stepped yet; its state would be lost "
                             "(LISA keeps state for the active layers only)")
        groups = _groups_by_name(model, user_optimizer)  # the tensors are replaced by sharding
        accepted = inspect.signature(type(user_optimizer).__init__).parameters
        defaults = {k: v for k, v in user_optimizer.defaults.items() if k in accepted}
        weight_dtype = next(model.parameters()).dtype
        shard_model(model, mp_bf16=options["bf16"] or weight_dtype == torch.bfloat16, reduce_fp32=True,
                    cpu_offload=options["cpu_offload"], layers_path=self.lisa.layers_path,
                    train_embeddings=self.lisa.train_embeddings, train_head=self.lisa.train_head)
        optimizer = FSDPLisaOptimizer(model, self.lisa, type(user_optimizer), groups=groups, **defaults)
        for scheduler in (a for a in args if isinstance(a, torch.optim.lr_scheduler.LRScheduler)):
            optimizer.adopt_scheduler(scheduler, user_optimizer)
        hf_compat.route_fsdp_optimizer_checkpoints(_optimizer_io)
        hf_compat.register_fsdp2_model(accelerator, model)
        prepared_optimizer = accelerator.prepare_optimizer(optimizer)
        # The rest after the optimizer: accelerate binds a scheduler to the prepared optimizer it wraps.
        rest = [i for i, a in enumerate(args) if a is not model and i != index]
        out = list(args)
        out[index] = prepared_optimizer
        if rest:
            placement = kwargs.get("device_placement")
            rest_kwargs = {} if placement is None else {"device_placement": [placement[i] for i in rest]}
            prepared = original_prepare(accelerator, *[args[i] for i in rest], **rest_kwargs)
            for i, obj in zip(rest, prepared if len(rest) > 1 else (prepared,)):
                out[i] = obj
        self.optimizer = optimizer
        return tuple(out) if len(out) > 1 else out[0]


def _movable(model: nn.Module, accelerator) -> bool:
    """Whether accelerate's prepare_model would move `model` to its device: not a model dispatched
    over devices by a device map, nor a quantized one (which `.to()` refuses)."""
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return False
    return not accelerator.verify_device_map(model)


def _optimizer_io(optimizer):
    """lisa_dist.backends.fsdp.dcp_checkpoint for an FSDPLisaOptimizer (torch's optimizer state-dict API cannot name
    its masters), None for any other optimizer."""
    from lisa_dist.backends.fsdp import FSDPLisaOptimizer
    if not isinstance(optimizer, FSDPLisaOptimizer):
        return None
    from lisa_dist.backends.fsdp import dcp_checkpoint as checkpoint
    return SimpleNamespace(save=checkpoint.save_optimizer, load=checkpoint.load_optimizer)


def _groups_by_name(model: nn.Module, optimizer: torch.optim.Optimizer):
    """`optimizer`'s param groups with parameter names for tensors, which survive sharding."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        unknown = [p for p in group["params"] if id(p) not in names]
        if unknown:
            raise ValueError("the optimizer holds tensors that are not parameters of the model being prepared; build "
                             "it over model.parameters() before prepare")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [names[id(p)] for p in group["params"]]})
    return groups


def prepare(accelerator, *objects, lisa: LisaConfig, device_placement=None):
    """`accelerator.prepare(*objects)` with LISA for the one model among `objects`; pass the model and
    its optimizer (and under DeepSpeed a scheduler built over that optimizer) in this one call."""
    hf_compat.check()
    models = [o for o in objects if isinstance(o, nn.Module)]
    if len(models) != 1:
        raise ValueError("lisa_dist.integrations.accelerate.prepare needs exactly one model among the objects, "
                         f"got {len(models)}")
    kwargs = {} if device_placement is None else {"device_placement": device_placement}
    return LisaPrepared(lisa).run(models[0], hf_compat.original_prepare(), accelerator, objects, kwargs)


def prepared_state(model: nn.Module) -> LisaPrepared:
    """The LISA state of a model prepared by `prepare` or by a Trainer with LisaCallback."""
    try:
        return _prepared[model]
    except KeyError:
        raise ValueError("this model was not prepared with LISA (lisa_dist.integrations.accelerate.prepare or "
                         "lisa_dist.integrations.hf.LisaCallback)") from None
