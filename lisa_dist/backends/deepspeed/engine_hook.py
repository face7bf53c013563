"""`initialize`: deepspeed.initialize for LISA, returning an engine that switches layers by itself.

The engine's `step()` is wrapped: after the step that ends an optimizer step (a gradient
accumulation boundary) it counts the step, and when the count reaches a multiple of
`interval_steps` it samples the next active set, checks every rank agrees, and rebuilds the ZeRO
optimizer over [always-active, active layers] (zero12.rebuild). `engine.lisa` exposes the schedule.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lisa_dist import vocab_rows
from lisa_dist.agreement import check_agreement
from lisa_dist.backends.deepspeed import _compat, engine_checkpoint, process_group, zero3, zero12
from lisa_dist.backends.deepspeed.importance import Calibration, engine_outlier_ratios, layer_grad_squares
from lisa_dist.backends.deepspeed.op_errors import explained_op_build_failures
from lisa_dist.backends.deepspeed.state_bytes import optimizer_bytes
from lisa_dist.config import LisaConfig
from lisa_dist.importance import LayerImportance
from lisa_dist.layers import ParamSplit, split_parameters
from lisa_dist.memory import device_memory
from lisa_dist.optim import refit_scheduler
from lisa_dist.sampling import LayerSampler, sample_layers


class LisaEngineState:
    """The LISA schedule of one engine (`engine.lisa`): what trains now and what happened so far."""

    def __init__(self, config: LisaConfig, split: ParamSplit, device: torch.device):
        self.config = config
        self.split = split
        self.sampler = LayerSampler(split.num_layers, config)
        self.importance = LayerImportance(split.num_layers, config)
        self.device = device
        self.active_layers: Tuple[int, ...] = ()
        self.switch_index = 0
        self.optimizer_steps = 0
        self.schedule_log: List[Dict[str, Any]] = []
        self.group_keys: List[zero12.GroupKey] = []
        # state_policy="offload": this rank's slices of deactivated layers, on the host.
        self.host: Optional[Dict[zero12.GroupKey, zero12.GroupSlice]] = (
            {} if config.state_policy == "offload" else None)
        self.option_sets: List[Dict[str, Any]] = []
        self.option_set: Dict[int, int] = {}
        self.managed: List[nn.Parameter] = ([p for _, p in split.always] + [p for _, p in split.frozen_outside]
                                            + [p for layer in split.per_layer for _, p in layer])

    def set_option_sets(self, option_sets: List[Dict[str, Any]], option_set: Dict[int, int]) -> None:
        """Give parameters different hyper-parameters: `option_sets[j]` for the params whose id maps
        to j in `option_set` (unlisted ones get set 0). Each part (always-active, each layer) is then
        split into one group per option set it has, so e.g. no-decay biases and norms keep weight_decay=0."""
        self.option_sets = [dict(o) for o in option_sets]
        self.option_set = dict(option_set)

    def _by_option_set(self, base: zero12.GroupKey, params: List[nn.Parameter]):
        if len(self.option_sets) <= 1:
            return [(base, params)]
        parts: List[List[nn.Parameter]] = [[] for _ in self.option_sets]
        for p in params:
            parts[self.option_set.get(id(p), 0)].append(p)
        return [(zero12.sub_key(base, j), ps) for j, ps in enumerate(parts) if ps]

    def groups(self, active: Sequence[int]) -> List[Tuple[zero12.GroupKey, List[nn.Parameter]]]:
        """Param groups for an active set: always-active first (if any), then each layer in order;
        a part with parameters of several option sets gives one group per set, in set order."""
        out: List[Tuple[zero12.GroupKey, List[nn.Parameter]]] = []
        if self.split.always:
            out.extend(self._by_option_set(zero12.ALWAYS, self.split.always_params))
        for i in sorted(active):
            out.extend(self._by_option_set(i, self.split.layer_params([i])))
        return out

    def rebuild(self, engine, new_groups, host) -> None:
        """Rebuild the engine's ZeRO optimizer over `new_groups`, each group with the current
        hyper-parameters of its option set (an LR scheduler has moved "lr" since the last build)."""
        options = None
        if len(self.option_sets) > 1:
            current: Dict[int, Dict[str, Any]] = {}
            for key, group in zip(self.group_keys, engine.basic_optimizer.param_groups):
                current.setdefault(zero12.option_set_of(key), zero12.inheritable(group))
            self.option_sets = [current.get(j, o) for j, o in enumerate(self.option_sets)]
            options = [self.option_sets[zero12.option_set_of(key)] for key, _ in new_groups]
        rebuild = zero3.rebuild if engine.zero_optimization_stage() == 3 else zero12.rebuild
        with _compat.quiet_logs(), _compat.rebuild_memory_policy():
            rebuild(engine, self.group_keys, new_groups, self.managed, host, options)

    def host_bytes(self) -> int:
        return sum(s.nbytes() for s in self.host.values()) if self.host is not None else 0

    def record(self, engine, seconds: float) -> None:
        # optimizer_bytes is what is live right after the switch: groups new to this interval get
        # their moments at their first step (DeepSpeed's optimizers allocate state lazily).
        self.schedule_log.append({"step": self.optimizer_steps, "switch_index": self.switch_index,
                                  "active_layers": list(self.active_layers), "seconds": seconds,
                                  "optimizer_bytes": optimizer_bytes(engine),
                                  "host_bytes": self.host_bytes(), "device_memory": device_memory()})
        if self.importance.probabilities is not None:
            self.schedule_log[-1]["probabilities"] = list(self.importance.probabilities)

    def after_optimizer_step(self, engine) -> None:
        self.optimizer_steps += 1
        if self.optimizer_steps % self.config.interval_steps == 0:
            self.switch(engine, self.optimizer_steps // self.config.interval_steps)

    def switch(self, engine, switch_index: int) -> None:
        from deepspeed.accelerator import get_accelerator

        # Timed on the device's clock: the step's kernels may still be running when it returns.
        get_accelerator().synchronize()
        start = time.perf_counter()
        active = self.importance.draw(self.sampler, switch_index)
        check_agreement(switch_index, active, self.device, self.importance.probabilities)
        new_groups = self.groups(active)
        new_keys = [key for key, _ in new_groups]
        # The same set drawn again keeps every group, and a rebuild would only reproduce the state.
        if new_keys != self.group_keys:
            self.rebuild(engine, new_groups, self.host)
        self.group_keys = new_keys
        self.active_layers = active
        self.switch_index = switch_index
        get_accelerator().synchronize()
        self.record(engine, time.perf_counter() - start)


class ZeroOptimizerView:
    """The optimizer `initialize` returns: the engine's current ZeRO optimizer, looked up on every
    use. Each switch replaces that optimizer; holding the first one would keep its buffers alive."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name: str):
        return getattr(self._engine.optimizer, name)

    def __repr__(self) -> str:
        return f"ZeroOptimizerView({type(self._engine.optimizer).__name__})"


def _check_ds_config(ds_config: dict) -> None:
    zero = ds_config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if stage not in (1, 2, 3):
        raise ValueError(
            "lisa_dist.backends.deepspeed.initialize needs ZeRO stage 1, 2 or 3, "
            f"the DeepSpeed config has stage {stage}; "
            "set \"zero_optimization\": {\"stage\": 2} (stage 0 keeps a full optimizer per rank: use "
            "lisa_dist.optim.LisaOptimizer with plain data parallelism instead)")
    offload = zero.get("offload_optimizer") or {}
    device = str(offload.get("device", "none")).lower()
    if device == "nvme" or str((zero.get("offload_param") or {}).get("device", "none")).lower() == "nvme":
        raise NotImplementedError(
            "offload to NVMe is not supported by the LISA hook (DeepSpeed's swappers keep files per sub-group "
            "that a rebuild would orphan); use \"device\": \"cpu\" in offload_optimizer and offload_param")
    if zero.get("zenflow") or offload.get("super_offload"):
        raise NotImplementedError(
            "ZenFlow and SuperOffload (zero_optimization.zenflow, offload_optimizer.super_offload) use their own "
            "stage-3 optimizers, which the LISA hook does not rebuild; remove them from the DeepSpeed config")


def client_option_sets(optimizer: torch.optim.Optimizer) -> Tuple[List[Dict[str, Any]], Dict[int, int], List[int]]:
    """The distinct hyper-parameter sets of a torch optimizer's groups, in first-seen order: the
    sets, param id -> set index, and for each set the index of the first group that has it."""
    sets: List[Dict[str, Any]] = []
    first: List[int] = []
    of_param: Dict[int, int] = {}
    for g, group in enumerate(optimizer.param_groups):
        options = {k: v for k, v in group.items() if k != "params"}
        j = next((i for i, o in enumerate(sets) if o == options), None)
        if j is None:
            sets.append(options)
            first.append(g)
            j = len(sets) - 1
        for p in group["params"]:
            of_param.setdefault(id(p), j)
    return sets, of_param, first


def _regroup_client_optimizer(optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                              groups: List[Tuple[zero12.GroupKey, List[nn.Parameter]]],
                              option_sets: List[Dict[str, Any]], first_group: List[int],
                              other_schedulers: Sequence[Any] = ()) -> None:
    """Re-point the caller's (still unused) torch optimizer at LISA's groups, in place, so an LR
    scheduler already bound to it keeps working; every switch re-fills this same object. Each LISA
    group takes the hyper-parameters of its option set (see LisaEngineState.set_option_sets)."""
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError("the optimizer passed to lisa_dist.backends.deepspeed.initialize already has state; pass a "
                         "freshly constructed optimizer (LISA builds its parameter groups itself)")
    old = len(optimizer.param_groups)
    sets = [zero12.option_set_of(key) for key, _ in groups]
    optimizer.param_groups = [{**option_sets[j], "params": list(params)} for j, (_, params) in zip(sets, groups)]
    schedulers = (([lr_scheduler] if lr_scheduler is not None and not callable(lr_scheduler) else [])
                  + list(other_schedulers))
    for scheduler in schedulers:
        bound = getattr(scheduler, "optimizer", None)
        if bound is not None and bound is not optimizer:
            raise ValueError("lr_scheduler is bound to a different optimizer than the one passed; build it "
                             "over the optimizer you pass to lisa_dist.backends.deepspeed.initialize")
        refit_scheduler(scheduler, old, [first_group[j] for j in sets])


def initialize(args=None, model: Optional[nn.Module] = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, distributed_port: Optional[int] = None, mpu=None,
               dist_init_required: Optional[bool] = None, collate_fn=None, config=None, mesh_param=None,
               config_params=None, *, lisa: LisaConfig, other_schedulers: Sequence[Any] = (),
               calibration: Optional[Calibration] = None):
    """`deepspeed.initialize` with LISA: same arguments and return value, plus `lisa`.

    Before the engine exists, only the always-active parameters and the first active set require
    grad and they are grouped [always-active, layer, layer, ...]; the returned engine re-samples
    every `lisa.interval_steps` optimizer steps inside `engine.step()` and exposes `engine.lisa`.
    `model_parameters`, if given, is ignored beyond a check: LISA decides what trains. `optimizer`
    may be None (taken from the DeepSpeed config), a fresh torch optimizer (re-used across switches,
    so a torch LR scheduler bound to it keeps working; groups with different hyper-parameters, such
    as Trainer's weight-decay / no-decay split, keep them: every always-active part and layer is
    split by option set), or a callable taking param groups. The returned optimizer is a view of the
    engine's current ZeRO optimizer. ZeRO stage 1, 2 and 3, with offload_optimizer to CPU (and
    offload_param to CPU on stage 3), in fp32, bf16 or fp16 (the loss scaler carries across every
    rebuild). `other_schedulers`: torch LR schedulers bound to `optimizer` that the caller steps
    itself (accelerate keeps them out of DeepSpeed); like `lr_scheduler` they get one entry per LISA group.

    `lisa.sampling="outlier"` needs `calibration`: batches (dicts for `model(**batch)`) or a callable
    `(rank, world_size) -> batches`, forwarded once through the new engine; the engine is built over
    a provisional set and rebuilt over the first outlier-weighted one.
    """
    _compat.check_deepspeed()
    import deepspeed
    from deepspeed import comm as ds_comm
    from deepspeed.accelerator import get_accelerator

    if not isinstance(lisa, LisaConfig):
        raise ValueError(f"lisa must be a lisa_dist.LisaConfig, got {type(lisa).__name__}")
    if model is None:
        raise ValueError("lisa_dist.backends.deepspeed.initialize needs model=")
    if model_parameters is not None:
        model_parameters = list(model_parameters)
        if any(isinstance(p, dict) for p in model_parameters):
            raise ValueError("lisa_dist builds the optimizer's parameter groups itself; pass model.parameters() "
                             "(or nothing) as model_parameters, not param-group dicts")
    from_args = config is None and config_params is None and getattr(args, "deepspeed_config", None) is not None
    if config is None:
        config = config_params if config_params is not None else getattr(args, "deepspeed_config", None)
    if config is None:
        raise ValueError("no DeepSpeed config: pass config= (dict or JSON path) or args.deepspeed_config")
    ds_config = _compat.load_ds_config(config)
    _check_ds_config(ds_config)
    zero_stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if zero_stage == 3 and lisa.embedding_update == "rows":
        raise vocab_rows.unsupported(
            "DeepSpeed ZeRO-3", "its parameters are partitioned in place and gathered per module, and the row "
            "deltas are applied from hooks on the embedding and head modules, which ZeRO-3 does not gather for")
    if zero_stage == 3:
        _compat.install_zero3_gather_fix()
    else:
        _compat.install_zero2_accumulation_fix()
    if optimizer is None and "optimizer" not in ds_config:
        raise ValueError("LISA trains through the optimizer: add an \"optimizer\" section to the DeepSpeed "
                         "config or pass optimizer=")
    outlier = lisa.sampling == "outlier"
    if outlier and calibration is None:
        raise ValueError("LisaConfig.sampling=\"outlier\" needs calibration batches: pass calibration= (a few "
                         "training batches, or a callable (rank, world_size) -> batches) to initialize")

    # The first active set must be agreed on before the engine is built over it.
    port_kwargs = {} if distributed_port is None else {"distributed_port": distributed_port}
    ds_comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                             dist_init_required=dist_init_required, **port_kwargs)
    process_group.release_shm_segments()
    _compat.install_gloo_all_gather_in_place()
    device = process_group.rank_device()
    split = split_parameters(model, lisa)
    state = LisaEngineState(lisa, split, device)
    if outlier:  # the ratios need the engine (ZeRO-3 forwards gather through it): a provisional set first
        active = sample_layers(state.sampler.config.seed, 0, split.num_layers, lisa.activated_layers)
    else:
        active = state.importance.draw(state.sampler, 0)
    check_agreement(0, active, device, state.importance.probabilities)
    if isinstance(optimizer, torch.optim.Optimizer):
        option_sets, option_set, first_group = client_option_sets(optimizer)
        state.set_option_sets(option_sets, option_set)
    groups = state.groups(active)
    trainable = {id(p) for _, params in groups for p in params}
    for p in state.managed:
        p.requires_grad_(id(p) in trainable)
    param_groups = [{"params": params} for _, params in groups]
    if isinstance(optimizer, torch.optim.Optimizer):
        _regroup_client_optimizer(optimizer, lr_scheduler, groups, option_sets, first_group, other_schedulers)

    with explained_op_build_failures(ds_config), _compat.zero12_build_fixes():
        engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, model_parameters=param_groups,
            training_data=training_data, lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=dist_init_required,
            collate_fn=collate_fn, config=None if from_args else ds_config, mesh_param=mesh_param, **port_kwargs)
    _compat.check_engine(engine)
    expected = _compat.zero3_optimizer_class() if int(engine.zero_optimization_stage()) == 3 \
        else _compat.zero12_optimizer_class()
    assert isinstance(engine.optimizer, expected), (
        f"expected DeepSpeed's {expected.__name__}, got {type(engine.optimizer).__name__}")
    assert len(engine.basic_optimizer.param_groups) == len(groups), "DeepSpeed dropped a LISA param group"
    del ds_optimizer

    state.group_keys = [key for key, _ in groups]
    state.active_layers = active
    engine.lisa = state
    _wrap_step(engine, state)
    engine_checkpoint.install(engine)  # save/load_checkpoint carry the LISA schedule and optimizer layout
    if outlier:
        state.importance.set_outlier_ratios(engine_outlier_ratios(engine, state, calibration))
        state.switch(engine, 0)
    else:
        state.record(engine, 0.0)
    return engine, ZeroOptimizerView(engine), loader, scheduler


def _wrap_step(engine, state: LisaEngineState) -> None:
    original = engine.step

    def step(lr_kwargs=None):
        # Read before stepping: step() advances the micro-step counter the boundary is derived from.
        boundary = engine.is_gradient_accumulation_boundary()
        if boundary and state.importance.needs_gradients:
            _measure_in_optimizer_step(engine, state, lambda: original(lr_kwargs=lr_kwargs))
        else:
            original(lr_kwargs=lr_kwargs)
        if boundary:
            state.after_optimizer_step(engine)

    engine.step = step


def _measure_in_optimizer_step(engine, state: LisaEngineState, run_step) -> None:
    """Record the active layers' gradient norms as the ZeRO optimizer's step begins: gradients are
    reduced by then whether backward went through engine.backward or torch (which DeepSpeed
    finalises inside engine.step), and not yet clipped or freed."""
    zero = engine.optimizer
    inner = zero.step

    def measured(*args, **kwargs):
        state.importance.observe(state.active_layers, layer_grad_squares(engine, state))
        return inner(*args, **kwargs)

    zero.step = measured
    try:
        run_step()
    finally:
        if zero.__dict__.get("step") is measured:
            del zero.step
