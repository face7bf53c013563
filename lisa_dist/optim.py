"""LisaOptimizer: single-process LISA, and the numerical reference for every distributed backend.

It wraps an ordinary torch optimizer built over fp32 master tensors for [always-active, active
layers] only. Frozen layers hold no master, no gradient and no optimizer state, so its memory is
that of an optimizer over the active set, not the peak set ever sampled (what the
`requires_grad`-toggling callbacks of LMFlow/axolotl/ms-swift grow into).
"""
from __future__ import annotations

import inspect
import json
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from lisa_dist.config import LisaConfig, check_resumable, resume_record
from lisa_dist.importance import LayerImportance
from lisa_dist.layers import ParamSplit, split_parameters
from lisa_dist.memory import local_tensor_bytes
from lisa_dist.outlier import outlier_ratios
from lisa_dist.sampling import LayerSampler

_STATE_FORMAT = 1

# torch.optim.lr_scheduler keeps these per param group; a scheduler built over the caller's
# optimizer must have one entry per group of the optimizer LISA gives it.
_PER_GROUP_SCHEDULER_ATTRS = ("base_lrs", "_last_lr", "lr_lambdas", "min_lrs", "max_lrs",
                              "base_momentums", "max_momentums")


def refit_scheduler(scheduler, old_groups: int, sources: List[int]) -> None:
    """Give a torch LR scheduler built over the caller's optimizer (`old_groups` groups) one entry per
    LISA group; the entry of new group i is that of the caller's group `sources[i]` (same options)."""
    for child in getattr(scheduler, "_schedulers", []):  # SequentialLR, ChainedScheduler
        refit_scheduler(child, old_groups, sources)
    for name in _PER_GROUP_SCHEDULER_ATTRS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == old_groups and list(range(old_groups)) != sources:
            setattr(scheduler, name, [values[j] for j in sources])


def _state_tensors(state: dict) -> List[torch.Tensor]:
    return [v for v in state.values() if torch.is_tensor(v)]


def _move_state(state: dict, device) -> dict:
    return {k: (v.to(device, copy=True) if torch.is_tensor(v) else v) for k, v in state.items()}


def _restore_state(state: dict, device, scalars_on_device: bool) -> dict:
    """A parked layer's optimizer state, back beside its master on `device`. torch keeps Adam's 0-d
    `step` on the host unless the optimizer is fused or capturable (torch/optim/adam.py); moved to a GPU
    it would be read back with .item() at every step, one device sync per parameter."""
    return {k: (v.to(device, copy=True) if torch.is_tensor(v) and (v.dim() > 0 or scalars_on_device) else v)
            for k, v in state.items()}


def _option_sets(model: nn.Module, groups: Optional[Sequence[dict]]) -> Tuple[List[dict], Dict[str, int]]:
    """Distinct hyper-parameter overrides of `groups` in first-seen order, and parameter name -> set."""
    if not groups:
        return [{}], {}
    names = {id(p): n for n, p in model.named_parameters()}
    sets: List[dict] = []
    of_name: Dict[str, int] = {}
    for group in groups:
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError(f"groups must be torch-style param groups (dicts with 'params'), got {group!r:.80}")
        options = {k: v for k, v in group.items() if k != "params"}
        j = next((i for i, o in enumerate(sets) if o == options), None)
        if j is None:
            sets.append(options)
            j = len(sets) - 1
        for p in group["params"]:
            name = p if isinstance(p, str) else names.get(id(p))
            if name is None:
                raise ValueError("a parameter in groups is not a parameter of the model (after sharding, give "
                                 "parameter names instead of the tensors)")
            of_name.setdefault(name, j)
    return sets, of_name


class LisaOptimizer(torch.optim.Optimizer):
    """A torch optimizer that trains always-active parameters plus `activated_layers` sampled decoder
    layers, re-sampled every `interval_steps` optimizer steps.

    The switch to interval k happens at the end of step k*K - 1 (and in `__init__` for k = 0), so the
    backward of step k*K already computes gradients for the new set. `param_groups[0]` holds the
    always-active parameters and `param_groups[1]` the active layers; both carry the optimizer
    hyper-parameters, so torch LR schedulers work unchanged.

    `groups` gives some parameters other hyper-parameters, in torch's param-group form (each dict's
    "params" are parameters or their names in `model`; its other keys override `optimizer_kwargs`),
    e.g. weight_decay=0 for biases and norms. With S distinct option sets there are 2*S groups, a
    fixed layout: `param_groups[j]` the always-active parameters of set j, `param_groups[S + j]`
    the active layers' parameters of set j. Parameters in no group get set 0.

    Under `config.sampling="outlier"`, `calibration` (an iterable of batches, dicts for
    `model(**batch)`; labels are dropped) is forwarded once here to measure the outlier ratios.
    Under "gradient", each step measures the active layers' gradient norms (see `record_gradients`).
    """

    def __init__(self, model: nn.Module, config: LisaConfig,
                 optimizer_cls: Type[torch.optim.Optimizer] = torch.optim.AdamW, *,
                 groups: Optional[Sequence[dict]] = None, calibration: Optional[Iterable[Dict[str, Any]]] = None,
                 **optimizer_kwargs):
        self.config = config
        self.split: ParamSplit = split_parameters(model, config)
        self.sampler = LayerSampler(self.split.num_layers, config)
        self.importance = LayerImportance(self.split.num_layers, config)
        self._observed = False
        if config.sampling == "outlier":
            if calibration is None:
                raise ValueError("LisaConfig.sampling=\"outlier\" needs calibration batches: pass calibration= "
                                 "(a few training batches) to the optimizer")
            self.importance.set_outlier_ratios(self._outlier_ratios(model, calibration))
        self._names: Dict[nn.Parameter, str] = {p: n for n, p in self.split.always}
        for layer in self.split.per_layer:
            self._names.update((p, n) for n, p in layer)
        self._option_sets, self._option_set = _option_sets(model, groups)
        # Master per trainable model param; it *is* the param when the model is fp32 already.
        self._masters: "OrderedDict[nn.Parameter, torch.Tensor]" = OrderedDict()
        # Host copies of deactivated layers under state_policy="offload": layer -> name -> (master|None, state).
        self._offloaded: Dict[int, Dict[str, Tuple[Optional[torch.Tensor], dict]]] = {}

        for _, p in self.split.frozen_outside:
            p.requires_grad_(False)
        for layer in self.split.per_layer:
            for _, p in layer:
                p.requires_grad_(False)
                p.grad = None
        always = [self._attach(p, None) for p in self.split.always_params]
        inner_groups = ([{**o, "params": [m for p, m in zip(self.split.always_params, always) if self._set_of(p) == j]}
                         for j, o in enumerate(self._option_sets)]
                        + [{**o, "params": []} for o in self._option_sets])
        self._inner = optimizer_cls(inner_groups, **optimizer_kwargs)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        self.optimizer_steps = 0
        self.switch_index = 0
        self.active_layers: Tuple[int, ...] = ()
        self._switch_to(self.importance.draw(self.sampler, 0))

    # The inner optimizer owns groups and state; load_state_dict replaces its lists, so delegate
    # instead of aliasing.
    @property
    def param_groups(self):
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self._inner.param_groups = value

    @property
    def state(self):
        return self._inner.state

    @state.setter
    def state(self, value):
        self._inner.state = value

    @property
    def defaults(self):
        return self._inner.defaults

    @defaults.setter
    def defaults(self, value):
        self._inner.defaults = value

    # --- masters and switching -------------------------------------------------------------

    def _attach(self, p: nn.Parameter, saved: Optional[Tuple[Optional[torch.Tensor], dict]]) -> torch.Tensor:
        """Make p trainable with a master (restored from `saved` under offload) and return the master."""
        p.requires_grad_(True)
        if p.dtype == torch.float32:
            master = p
        elif saved is not None and saved[0] is not None:
            master = saved[0].to(p.device, copy=True)
        else:
            master = p.detach().to(torch.float32, copy=True)
        self._masters[p] = master
        if saved is not None and saved[1]:
            options = {**self._inner.defaults, **self._option_sets[self._set_of(p)]}
            self._inner.state[master] = _restore_state(saved[1], p.device,
                                                       bool(options.get("fused") or options.get("capturable")))
        return master

    def _detach(self, p: nn.Parameter) -> Tuple[Optional[torch.Tensor], dict]:
        master = self._masters.pop(p)
        state = self._inner.state.pop(master, {})
        p.requires_grad_(False)
        p.grad = None
        if master is p:
            return None, state
        # The weight keeps its low-precision rounding of the master; offload keeps the master itself.
        return master, state

    def _switch_to(self, new_active: Tuple[int, ...]) -> None:
        old, new = set(self.active_layers), set(new_active)
        for i in sorted(old - new):
            saved = {self._names[p]: self._detach(p) for _, p in self.split.per_layer[i]}
            if self.config.state_policy == "offload":
                self._offloaded[i] = {n: ((m.to("cpu", copy=True) if m is not None else None),
                                          _move_state(st, "cpu")) for n, (m, st) in saved.items()}
        for i in sorted(new - old):
            saved = self._offloaded.pop(i, {})
            for name, p in self.split.per_layer[i]:
                self._attach(p, saved.get(name))
        sets = len(self._option_sets)
        for j in range(sets):
            self.param_groups[sets + j]["params"] = [self._masters[p] for p in self.split.layer_params(new_active)
                                                     if self._set_of(p) == j]
        self.active_layers = tuple(new_active)

    def _set_of(self, p: nn.Parameter) -> int:
        return self._option_set.get(self._names[p], 0)

    def adopt_scheduler(self, scheduler, optimizer: torch.optim.Optimizer) -> None:
        """Re-bind a torch LR scheduler built over `optimizer` (the one `from_optimizer` copied) to
        this optimizer, one entry per group, so it keeps its position and per-group base values."""
        if getattr(scheduler, "optimizer", None) is not optimizer:
            raise ValueError("the LR scheduler is bound to another optimizer than the one LISA replaces")
        sources = []
        for group in self.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            sources.append(next((i for i, g in enumerate(optimizer.param_groups)
                                 if {k: v for k, v in g.items() if k != "params"} == options), 0))
        for child in [scheduler, *getattr(scheduler, "_schedulers", [])]:
            child.optimizer = self
        refit_scheduler(scheduler, len(optimizer.param_groups), sources)

    @classmethod
    def from_optimizer(cls, model: nn.Module, config: LisaConfig, optimizer: torch.optim.Optimizer, **kwargs):
        """A LisaOptimizer of `optimizer`'s class, defaults and param-group hyper-parameters (e.g. the
        one Trainer.create_optimizer built); `optimizer` itself must be unused and is left alone."""
        if any(len(st) for st in optimizer.state.values()):
            raise ValueError("LisaOptimizer.from_optimizer needs an optimizer that has not stepped yet; its state "
                             "would be lost (LISA keeps state for the active layers only)")
        accepted = inspect.signature(type(optimizer).__init__).parameters
        defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        return cls(model, config, type(optimizer), groups=optimizer.param_groups, **defaults, **kwargs)

    def _trained(self) -> List[Tuple[nn.Parameter, torch.Tensor]]:
        return list(self._masters.items())

    # --- importance statistics ---------------------------------------------------------------

    def _outlier_ratios(self, model: nn.Module, calibration: Iterable[Dict[str, Any]]) -> List[float]:
        device = next(model.parameters()).device
        return outlier_ratios(self.split_layers(model), lambda b: _forward(model, b, device), calibration,
                              self.config.outlier_threshold)

    def split_layers(self, model: nn.Module) -> List[nn.Module]:
        from lisa_dist.layers import find_decoder_layers
        return list(find_decoder_layers(model, self.split.layers_path).layers)

    def _sum_across_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """One process: nothing to sum (FSDP2 all-reduces its shards' contributions)."""
        return t

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    @torch.no_grad()
    def record_gradients(self) -> None:
        """sampling="gradient": record each active layer's squared gradient norm for this step.
        `step()` calls it when the caller has not; a runner calls it before clipping, so every
        backend measures the unclipped gradient (DeepSpeed clips inside its step)."""
        if not self.importance.needs_gradients or self._observed:
            return
        # Summed where the gradients are and copied to the host once: a .cpu() per parameter would
        # synchronize with the GPU once per parameter.
        device = next(iter(self._masters)).device if self._masters else torch.device("cpu")
        per_layer = []
        for i in self.active_layers:
            squares = [self._local(p.grad).double().pow(2).sum() for _, p in self.split.per_layer[i]
                       if p.grad is not None]
            per_layer.append(torch.stack(squares).sum().to(device) if squares
                             else torch.zeros((), dtype=torch.float64, device=device))
        sq = torch.stack(per_layer) if per_layer else torch.zeros(0, dtype=torch.float64, device=device)
        self.importance.observe(self.active_layers, self._sum_across_ranks(sq).cpu().tolist())
        self._observed = True

    # --- torch optimizer surface ---------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.record_gradients()
        for p, master in self._trained():
            if master is not p:
                master.grad = None if p.grad is None else p.grad.to(torch.float32)
        self._inner.step()
        for p, master in self._trained():
            if master is not p:
                p.copy_(master)
                master.grad = None
        self._observed = False
        self.optimizer_steps += 1
        if self.optimizer_steps % self.config.interval_steps == 0:
            self.switch_index = self.optimizer_steps // self.config.interval_steps
            self._switch_to(self.importance.draw(self.sampler, self.switch_index))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, master in self._trained():
            for t in (p, master):
                if t.grad is None:
                    continue
                if set_to_none:
                    t.grad = None
                else:
                    t.grad.zero_()

    def state_bytes(self) -> Dict[str, int]:
        """Bytes this rank holds for training beyond the model weights: fp32 masters that are not the
        weights themselves, optimizer state on the device, and host copies kept by `offload`."""
        masters = [m for p, m in self._masters.items() if m is not p]
        state = [t for st in self._inner.state.values() for t in _state_tensors(st)]
        host = [t for layer in self._offloaded.values() for m, st in layer.values()
                for t in ([m] if m is not None else []) + _state_tensors(st)]
        return {"master": local_tensor_bytes(masters), "optimizer_state": local_tensor_bytes(state),
                "offloaded_host": local_tensor_bytes(host)}

    def check_resumable(self, saved: dict, source: str) -> None:
        """Raise ValueError naming every difference between `saved` (a state dict's "lisa" section) and
        this optimizer that a resume cannot bridge (lisa_dist.config.check_resumable)."""
        check_resumable(saved, self.config, self.split.num_layers, source)

    def state_dict(self) -> dict:
        masters = {self._names[p]: m.detach().clone() for p, m in self._masters.items() if m is not p}
        offloaded = {str(i): {n: {"master": m, "state": st} for n, (m, st) in layer.items()}
                     for i, layer in self._offloaded.items()}
        return {"format": _STATE_FORMAT,
                "lisa": {**resume_record(self.config, self.split.num_layers),
                         "optimizer_steps": self.optimizer_steps, "switch_index": self.switch_index,
                         "active_layers": list(self.active_layers),
                         # a string: DCP restores a non-tensor leaf whole, whatever its structure
                         "importance": json.dumps(self.importance.state_dict())},
                "inner": self._inner.state_dict(), "masters": masters, "offloaded": offloaded}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the schedule position, the active set, masters and moments. Load the model
        weights first: frozen layers are taken from the model as they are."""
        lisa = state_dict["lisa"]
        self.check_resumable(lisa, "this LisaOptimizer state dict")
        for i in sorted(self.active_layers):  # drop current set; the saved one is rebuilt below
            for _, p in self.split.per_layer[i]:
                self._detach(p)
        self.active_layers = ()
        self._offloaded = {int(i): {n: (e["master"], e["state"]) for n, e in layer.items()}
                           for i, layer in state_dict["offloaded"].items()}
        self._switch_to(tuple(lisa["active_layers"]))
        with torch.no_grad():
            for p, m in self._masters.items():
                name = self._names[p]
                if m is not p and name in state_dict["masters"]:
                    m.copy_(state_dict["masters"][name])
        self._inner.load_state_dict(state_dict["inner"])
        self.optimizer_steps = lisa["optimizer_steps"]
        self.switch_index = lisa["switch_index"]
        if "importance" in lisa:
            self.importance.load_state_dict(json.loads(lisa["importance"]))
        self._observed = False


def _forward(model: nn.Module, batch: Dict[str, Any], device) -> Any:
    """A calibration forward: no labels (no loss needed), tensors on the model's device."""
    return model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
