"""Peak memory per rank of a training step, for full fine-tuning, LISA and LoRA: the dry run's numbers.

    peak = resident + max(backward phase, optimizer-step phase)

- resident: what stays between steps, the model-state floor of docs/design.md#memory-floors less
  the gradients that every engine frees at zero_grad (ZeRO-3 keeps its gradient partitions and
  reduce bucket allocated; FSDP2 and ZeRO-1/2 do not), plus persistent engine buffers.
- backward phase: the traced step on the meta device (lisa_dist.recipe.step_trace: activations
  saved for backward, the logits and the loss's upcast copies, recomputation under gradient
  checkpointing, gradients an engine has not yet moved) plus the engine's buffers alive then:
  DeepSpeed's reduction buckets and its gradient partition, ZeRO-3's gathered parameters, FSDP2's
  all-gathered units and unsharded gradients.
- optimizer-step phase: gradients held, their fp32 copies and the optimizer's temporaries.

One process is traced whole, optimizer step included (LisaOptimizer for full fine-tuning and LISA,
AdamW over the adapters for LoRA), so nothing is modelled there. The engines' buffers are modelled
from their configs and sources (DeepSpeed 0.19, torch 2.13 FSDP2), each term named where it is
computed; benchmarks/planner_validation.py measures the sum against real steps.

`device` is where the job runs: "cuda" (the default: a dry run plans the GPU job even on a login
node) or "cpu". It changes two things: torch's AdamW defaults to the foreach implementation on
GPUs (one temporary of the size of a parameter group) and to a loop over tensors on CPUs; and a
buffer that torch.empty allocates but a step only partly writes (a 5e8-element DeepSpeed bucket
for a small model) is resident on a GPU at its full size, on a CPU only where it was written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from lisa_dist.config import LisaConfig
from lisa_dist.layers import ParamSplit
from lisa_dist.memory import model_state_floor

METHODS = ("full", "lisa", "lora")
STATE_KEYS = ("weights", "grads", "master", "optimizer_state")
DEVICES = ("cuda", "cpu")

# DeepSpeed's defaults where a config leaves a key out (deepspeed/runtime/zero/config.py, 0.19).
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "overlap_comm": None, "contiguous_gradients": True,
               "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
               "stage3_max_reuse_distance": 1e9,
               "stage3_param_persistence_threshold": 1e5}


# ------------------------------------------------------------------------ always-active parameters

@dataclass
class AlwaysActiveCost:
    """What LISA's always-active parameters (embeddings, head, final norm: LisaConfig.train_embeddings /
    train_head) cost per rank beyond their weights, which are in every row's weights already."""

    trained: List[Tuple[str, nn.Parameter]]
    """Parameters that require grad in the traced step: their input gradients and weight gradients are
    what autograd computes, so they decide what the trace counts (a trained input embedding makes every
    layer's hidden states require grad; a frozen one leaves the layers below the first active one
    saving nothing)."""

    numel: int
    """Elements counted in Psi_a (the dry run's "always-active" figure)."""

    states: Dict[str, float]
    """Per-rank bytes by model-state category ("grads", "master", "optimizer_state")."""

    step_adjust: float = 0.0
    """Bytes to add to (or, negative, remove from) the traced step: for a state policy whose gradient or
    update is not the dense tensor autograd and AdamW allocate (row-sparse, factored, low-rank)."""


def always_active_cost(split: ParamSplit, lisa: LisaConfig, stage: str, world: int,
                       weight_bytes: int) -> AlwaysActiveCost:
    """THE place where an always-active parameter's state and activation cost is decided. Today every
    always-active parameter trains densely: a gradient in the weights' dtype, an fp32 master and two
    fp32 Adam moments, sharded as the stage shards trainable state. A new embedding/head state policy
    (LisaConfig field) branches here: it returns which parameters still require grad in the trace, its
    per-category bytes, and `step_adjust` for what its update allocates differently from AdamW."""
    numel = sum(p.numel() for _, p in split.always)
    dense = model_state_floor(stage, 0, numel, world, weight_bytes)
    return AlwaysActiveCost(trained=list(split.always), numel=numel,
                            states={k: dense[k] for k in ("grads", "master", "optimizer_state")})


def lisa_state_floor(stage: str, psi: int, layer_numel: int, always: AlwaysActiveCost, world: int,
                     weight_bytes: int) -> Dict[str, float]:
    """LISA's per-rank model states: every weight, the gamma largest layers' dense training state, and
    the always-active parameters' state as `always_active_cost` gives it."""
    if always.numel + layer_numel == 0:
        raise ValueError("LISA trains nothing: no always-active parameters and no layers")
    floor = model_state_floor(stage, psi, layer_numel, world, weight_bytes)
    out = {k: floor[k] + always.states.get(k, 0.0) for k in STATE_KEYS}
    out["total"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------- engine model

@dataclass
class Engine:
    """The engine a plan is for: stage ("single", "zero1/2/3", "fsdp2"), ranks, where it runs, and the
    DeepSpeed zero_optimization section (empty for the others)."""

    stage: str
    world: int
    weight_bytes: int
    device: str = "cuda"
    zero: Dict = field(default_factory=dict)

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")

    def ds(self, key: str) -> float:
        value = self.zero.get(key, DS_DEFAULTS[key])
        return float(value) if not isinstance(value, bool) and value is not None else value

    @property
    def overlap_comm(self) -> bool:
        value = self.zero.get("overlap_comm")
        # DeepSpeed turns overlap_comm on by default for ZeRO-3 only.
        return bool(value) if value is not None else self.stage == "zero3"

    def written(self, allocated: float, used: float) -> float:
        """A buffer torch.empty allocates at `allocated` bytes of which a step writes `used`: a GPU
        allocator holds all of it, a CPU's resident memory only the written pages."""
        return allocated if self.device == "cuda" else min(allocated, used)


@dataclass
class Shape:
    """Sizes of the model the engine terms need (elements)."""

    trainable: int
    """Parameters this method trains (Psi, Psi_a or the adapters)."""

    largest_layer: int
    """The largest decoder layer (what FSDP2 gathers per unit, ZeRO-3 per layer)."""

    largest_trained_layer: int
    """The largest decoder layer that trains (its unsharded gradients exist between its backward and
    its reduce-scatter); for LoRA the adapters of one layer."""

    outside: int
    """Parameters outside the decoder layers (embeddings, head, final norm: FSDP2's root unit)."""

    outside_trained: int
    """Of those, the ones that train."""

    head: int
    """The output embeddings' weight (gathered under ZeRO-3 at the logits, the peak's moment)."""

    num_layers: int = 1
    """Decoder layers (ZeRO-3 keeps the top ones gathered from their forward to their backward)."""


def zero3_kept_gathered(engine: Engine, shape: Shape) -> float:
    """Elements ZeRO-3 keeps gathered at the loss because they are used again soon: after a module runs,
    DeepSpeed releases its parameters unless the trace shows them fetched again within
    stage3_max_reuse_distance elements (partitioned_param_coordinator.__params_to_release, 0.19). At the
    loss that is the head and the top layers: layer L-k is used again in backward after the k layers
    above it are fetched twice and the head once. A model smaller than half the distance stays gathered
    whole through the step."""
    reuse = engine.ds("stage3_max_reuse_distance")
    kept, above = shape.head, 0
    for _ in range(shape.num_layers):
        if 2 * above + shape.head > reuse:
            break
        kept += shape.largest_layer
        above += shape.largest_layer
    return kept


@dataclass
class PeakEstimate:
    """One method's per-rank peak, in bytes."""

    states: Dict[str, float]
    """The model-state floor (weights, grads, master, optimizer_state, total)."""

    resident: float
    """Alive between steps: the floor less the gradients freed at zero_grad, plus persistent buffers."""

    activations: float
    """At the end of forward: what autograd saved for backward, the logits and the loss's copies."""

    backward: float
    """Backward phase above resident: the traced peak plus the engine buffers alive then."""

    optimizer_step: float
    """Optimizer-step phase above resident."""

    buffers: Dict[str, float]
    """The engine buffers in those phases (named as in the engine's source)."""

    math_attention: bool = False

    @property
    def rise(self) -> float:
        """What a step adds above resident at its peak (what benchmarks/planner_validation.py measures)."""
        return max(self.backward, self.optimizer_step)

    @property
    def peak(self) -> float:
        return self.resident + self.rise

    @property
    def phase(self) -> str:
        return "backward" if self.backward >= self.optimizer_step else "optimizer step"

    def to_dict(self) -> Dict:
        return {"states": self.states, "resident": self.resident, "activations": self.activations,
                "backward": self.backward, "optimizer_step": self.optimizer_step, "buffers": self.buffers,
                "rise": self.rise, "peak": self.peak, "phase": self.phase, "math_attention": self.math_attention}


def combine(engine: Engine, states: Dict[str, float], shape: Shape, trace, adjust: float = 0.0) -> PeakEstimate:
    """A method's peak from its model states, the traced step and the engine's buffers.

    `trace` is a StepTrace traced as `trace_grads(engine)` says: whole with its optimizer for one
    process; gradients dropped at accumulation (the engine moves them) for DeepSpeed; for FSDP2 the
    gradients of the root unit (parameters outside the layers) kept, since it reduce-scatters once,
    at the end of backward."""
    wb, n, g = engine.weight_bytes, engine.world, shape.trainable
    resident = states["total"] - states["grads"]
    buffers: Dict[str, float] = {}
    backward = trace.backward_peak + adjust
    step = trace.step_peak + adjust
    if engine.stage == "single":
        pass  # the trace holds the gradients and LisaOptimizer / AdamW's own step
    elif engine.stage in ("zero1", "zero2"):
        # stage_1_and_2.setup_buckets: contiguous_gradients allocates reduce_bucket_size elements in the
        # weights' dtype at the start of backward, twice with overlap_comm; released in the epilogue.
        if engine.ds("contiguous_gradients"):
            count = 2 if engine.overlap_comm else 1
            bucket = engine.ds("reduce_bucket_size")
            buffers["ipg_buckets"] = count * engine.written(bucket * wb, min(bucket, g) * wb)
        # The reduced gradients this rank keeps (the floor's grads: grads_in_partition for ZeRO-2,
        # whole averaged gradients for ZeRO-1), filled during backward.
        buffers["gradients"] = states["grads"]
        # step(): the partition is flattened (a copy) and converted to the fp32 master's dtype.
        buffers["flat_gradient_partition"] = wb * g / n
        buffers["fp32_gradient_partition"] = 4 * g / n if wb != 4 else 0.0
        backward += buffers.get("ipg_buckets", 0.0) + buffers["gradients"]
        step = buffers["gradients"] + buffers["flat_gradient_partition"] + buffers["fp32_gradient_partition"]
    elif engine.stage == "zero3":
        # stage3.__init__ allocates the ipg bucket and the flat gradient partitions once: resident.
        bucket = engine.ds("reduce_bucket_size")
        buffers["ipg_bucket (resident)"] = engine.written(bucket * wb, min(bucket, g) * wb) \
            if engine.ds("contiguous_gradients") else 0.0
        resident += states["grads"] + buffers["ipg_bucket (resident)"]
        # Gathered parameters at the loss: the head (or the largest layer) being computed, plus what
        # the prefetcher has fetched ahead, capped by max_live_parameters.
        current = max(shape.head, shape.largest_layer)
        gathered = min(current + engine.ds("stage3_prefetch_bucket_size"),
                       max(current, engine.ds("stage3_max_live_parameters")))
        # ... or, when more, what is kept gathered for its reuse in backward.
        buffers["gathered_parameters"] = wb * max(gathered, zero3_kept_gathered(engine, shape))
        buffers["fp32_gradient_partition"] = 4 * g / n if wb != 4 else 0.0
        backward += buffers["gathered_parameters"]
        step = buffers["fp32_gradient_partition"]
    elif engine.stage == "fsdp2":
        # The root unit (everything outside the layers) stays unsharded from forward to the end of
        # backward; the last layer is not resharded after forward and the next one is prefetched.
        # All-gather outputs are new full-size buffers beside the shards.
        buffers["root_unit"] = wb * shape.outside
        buffers["layer_units"] = 2 * wb * shape.largest_layer
        # A trained unit's gradients, unsharded in the weights' dtype, cast to fp32 to reduce-scatter.
        reduce_bytes = wb + (4 if wb != 4 else 0)
        buffers["unsharded_layer_gradients"] = reduce_bytes * shape.largest_trained_layer
        buffers["gradients"] = states["grads"]
        backward += (buffers["root_unit"] + buffers["layer_units"] + buffers["unsharded_layer_gradients"]
                     + buffers["gradients"])
        # LisaOptimizer: master.grad = grad.to(fp32), then AdamW (foreach on GPUs: one fp32 temporary).
        buffers["fp32_gradient_copies"] = 4 * g / n if wb != 4 else 0.0
        buffers["adamw_foreach_temporary"] = 4 * g / n if engine.device == "cuda" else 0.0
        step = buffers["gradients"] + buffers["fp32_gradient_copies"] + buffers["adamw_foreach_temporary"]
    else:
        raise ValueError(f"unknown stage {engine.stage!r}")
    return PeakEstimate(states=states, resident=resident, activations=trace.forward_end, backward=backward,
                        optimizer_step=step, buffers=buffers, math_attention=trace.math_attention)


# --------------------------------------------------------------------------- meta models per method

def trace_layers(split: ParamSplit, gamma: int, embeddings_train: bool) -> Tuple[int, ...]:
    """The active layers to trace LISA with, the costliest switch: the gamma largest layers; with the
    input embeddings frozen, the first layer among them (layers below the first active one save
    nothing for backward, so the lowest possible first active layer is the worst case)."""
    sizes = [sum(p.numel() for _, p in layer) for layer in split.per_layer]
    picked = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))[:gamma]
    if not embeddings_train and 0 not in picked:
        picked[-1] = 0
    return tuple(sorted(picked))


def set_trainable(model: nn.Module, params: Sequence[nn.Parameter]) -> None:
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def apply_lora(model: nn.Module, rank: int, targets: str, adapter_fp32: bool) -> nn.Module:
    """peft's LoRA on the meta model, as a run would apply it: base weights frozen, adapters on
    `targets` ("all-linear" or comma-separated module names). peft keeps adapters in fp32 under a
    bf16 base by default (autocast_adapter_dtype), which one process keeps; DeepSpeed and FSDP2 cast
    the whole module to the weights' dtype."""
    import warnings

    import peft

    target = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target, lora_dropout=0.0)
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        try:
            lora = peft.get_peft_model(model, config, autocast_adapter_dtype=adapter_fp32)
        except ValueError as e:  # peft names the modules it did not find
            raise ValueError(f"--dry-run-lora-targets {targets}: {e} Use all-linear or names of the model's "
                             "linear layers, e.g. q_proj,v_proj") from None
    if not adapter_fp32:
        dtype = next(p for p in model.parameters() if not p.requires_grad).dtype
        for p in lora.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    return lora


def trace_grads(engine: Engine, outside: Callable[[nn.Parameter], bool]) -> Callable[[nn.Parameter], bool]:
    """Which gradients the traced step keeps alive after accumulation (see `combine`)."""
    if engine.stage == "single":
        return lambda p: True
    if engine.stage == "fsdp2":
        return outside
    return lambda p: False


# ------------------------------------------------------------------------------------- the driver

@dataclass
class MethodPlan:
    """The peak of one method and the sizes behind it."""

    peak: PeakEstimate
    trainable: int
    traced_layers: Tuple[int, ...] = ()


def meta_model(config, dtype: torch.dtype, gradient_checkpointing: bool, trust_remote_code: bool = False):
    """The model on the meta device in the run's dtype, in training mode, with fused attention and,
    if asked, transformers' non-reentrant gradient checkpointing (what lisa-train enables)."""
    import transformers

    from lisa_dist.recipe.step_trace import use_fused_attention

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              trust_remote_code=trust_remote_code)
    use_fused_attention(model)
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _dtype(weight_bytes: int, fp16: bool = False) -> torch.dtype:
    return torch.float32 if weight_bytes == 4 else torch.float16 if fp16 else torch.bfloat16


def _clip(model: nn.Module) -> Callable[[], None]:
    # SingleRunner clips before stepping (max_grad_norm 1.0 by default); its norms are small temporaries.
    return lambda: torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)


def estimate_method(method: str, config, lisa: LisaConfig, engine: Engine, *, batch_size: int, seq_len: int,
                    gradient_checkpointing: bool = False, lora_rank: int = 8, lora_targets: str = "all-linear",
                    fp16: bool = False, trust_remote_code: bool = False) -> MethodPlan:
    """Build the method's meta model, trace its step and combine it with its states and the engine."""
    from lisa_dist.layers import find_decoder_layers, split_parameters
    from lisa_dist.optim import LisaOptimizer
    from lisa_dist.recipe.step_trace import trace_step

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    wb, n = engine.weight_bytes, engine.world
    model = meta_model(config, _dtype(wb, fp16), gradient_checkpointing, trust_remote_code)
    split = split_parameters(model, lisa)
    psi = sum(p.numel() for p in model.parameters())
    layer_sizes = [sum(p.numel() for _, p in layer) for layer in split.per_layer]
    layers = find_decoder_layers(model, split.layers_path).layers
    head = model.get_output_embeddings()
    head_numel = head.weight.numel() if head is not None else 0
    outside = psi - sum(layer_sizes)
    foreach = engine.device == "cuda"
    optimizer, before_step, adjust, traced = None, None, 0.0, ()

    if method == "lisa":
        always = always_active_cost(split, lisa, engine.stage, n, wb)
        traced = trace_layers(split, lisa.activated_layers, lisa.train_embeddings)
        layer_numel = sum(layer_sizes[i] for i in traced)
        states = lisa_state_floor(engine.stage, psi, layer_numel, always, n, wb)
        trainable = always.numel + layer_numel
        set_trainable(model, [p for _, p in always.trained] + [p for i in traced for _, p in split.per_layer[i]])
        adjust = always.step_adjust
        if engine.stage == "single":
            # The traced switch drawn on purpose: weights on exactly the traced layers.
            pinned = LisaConfig(activated_layers=len(traced), interval_steps=10 ** 9, seed=lisa.seed,
                                train_embeddings=lisa.train_embeddings, train_head=lisa.train_head,
                                layers_path=lisa.layers_path, sampling="weighted",
                                layer_weights=tuple(1.0 if i in traced else 0.0 for i in range(len(layer_sizes))))
            optimizer = LisaOptimizer(model, pinned, torch.optim.AdamW, lr=1e-5, foreach=foreach)
        shape = Shape(trainable=trainable, largest_layer=max(layer_sizes),
                      largest_trained_layer=max(layer_sizes[i] for i in traced),
                      outside=outside, outside_trained=always.numel, head=head_numel,
                      num_layers=len(layer_sizes))
    elif method == "full":
        states = model_state_floor(engine.stage, psi, psi, n, wb)
        trainable = psi
        set_trainable(model, list(model.parameters()))
        if engine.stage == "single":
            everything = LisaConfig(activated_layers=len(layer_sizes), interval_steps=10 ** 9,
                                    layers_path=lisa.layers_path)
            optimizer = LisaOptimizer(model, everything, torch.optim.AdamW, lr=1e-5, foreach=foreach)
        shape = Shape(trainable=psi, largest_layer=max(layer_sizes), largest_trained_layer=max(layer_sizes),
                      outside=outside, outside_trained=outside, head=head_numel,
                      num_layers=len(layer_sizes))
    else:
        set_trainable(model, [])
        model = apply_lora(model, lora_rank, lora_targets, adapter_fp32=engine.stage == "single")
        adapters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        trainable = sum(p.numel() for _, p in adapters)
        states = model_state_floor(engine.stage, psi + trainable, trainable, n, wb)
        if engine.stage == "single":
            optimizer = torch.optim.AdamW([p for _, p in adapters], lr=1e-5, foreach=foreach)
        per_layer = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in layers]
        shape = Shape(trainable=trainable, largest_layer=max(layer_sizes), largest_trained_layer=max(per_layer),
                      outside=outside, outside_trained=0, head=head_numel,
                      num_layers=len(layer_sizes))
    if optimizer is not None:
        before_step = _clip(model)
    in_layers = {id(p) for p in layers.parameters()}  # after LoRA: its adapters too
    keep = trace_grads(engine, lambda p: id(p) not in in_layers)
    trace = trace_step(model, batch_size, seq_len, optimizer=optimizer, keep_grad=keep, before_step=before_step)
    return MethodPlan(peak=combine(engine, states, shape, trace, adjust), trainable=trainable, traced_layers=traced)
