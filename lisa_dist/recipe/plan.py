"""`lisa-train --dry-run`: what a launch would cost per rank, without loading weights or starting processes.

Resolves the world size from the launcher's environment, builds the model skeleton on the meta
device (no storage is allocated, so a 70B config takes seconds on a laptop) to count Psi (every
parameter) and Psi_a (always-active parameters + the gamma largest decoder layers), and prints the
analytic per-rank model-state floor of docs/design.md#memory-floors for full fine-tuning, for LISA and for
LoRA (PEFT on --dry-run-lora-targets at rank --dry-run-lora-rank), then the per-rank PEAK of a
training step of each (lisa_dist/recipe/plan_memory.py): the model states, plus a step of
--batch-size x --max-length tokens traced on the meta device (activations saved for backward, the
logits and the loss's upcast copies, recomputation under --gradient-checkpointing, gradients and
optimizer temporaries), plus the engine's buffers (DeepSpeed buckets and gathered parameters from the
ds config, FSDP2's all-gathered units), and the first switches of the layer schedule. The CUDA
context, NCCL's buffers and the allocator's fragmentation come on top.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from lisa_dist.memory import ParamCounts, byte_unit, count_params, format_bytes, model_state_floor
from lisa_dist.recipe.plan_memory import (
    METHODS,
    Engine,
    MethodPlan,
    always_active_cost,
    estimate_method,
    lisa_state_floor,
)
from lisa_dist.recipe.run_config import RunConfig
from lisa_dist.sampling import LayerSampler

SHOWN_SWITCHES = 6
STAGE_NAMES = {"single": "single process", "zero1": "DeepSpeed ZeRO-1", "zero2": "DeepSpeed ZeRO-2",
               "zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2"}


@dataclass
class DryRunPlan:
    model: str
    architecture: str
    layers_path: str
    counts: ParamCounts
    psi_active: int
    world_size: int
    world_size_source: str
    stage: str
    weight_bytes: int
    weights_desc: str
    offload: Tuple[str, ...]
    """Model-state categories DeepSpeed keeps in host memory ("master", "optimizer_state", "weights")."""
    schedule: List[Tuple[int, int, Tuple[int, ...]]]
    """(switch index, first optimizer step, active layers) for the first switches."""
    intervals: int
    schedule_note: str = ""
    """Under sampling="outlier"/"gradient": why the (rest of the) schedule cannot be printed."""
    full: Dict[str, float] = field(default_factory=dict)
    lisa: Dict[str, float] = field(default_factory=dict)
    lora_rank: int = 8
    lora_params: int = 0
    """LoRA adapter parameters at lora_rank on every linear layer but the LM head (what PEFT's
    target_modules="all-linear" adapts): rank x (in + out) per layer."""
    lora: Dict[str, float] = field(default_factory=dict)
    by_stage: Dict[str, Tuple[float, float, float]] = field(default_factory=dict)
    """stage -> (full, LISA, LoRA) total bytes per rank at this world size, without offload."""
    batch_size: int = 1
    seq_len: int = 1
    gradient_checkpointing: bool = False
    device: str = "cuda"
    methods: Dict[str, MethodPlan] = field(default_factory=dict)
    """"full", "lisa", "lora" -> the step's peak per rank (plan_memory.PeakEstimate) and its sizes."""

    def peak(self, method: str) -> float:
        """Per-rank peak on the accelerator: offloaded states live in host memory instead."""
        estimate = self.methods[method].peak
        return estimate.peak - sum(estimate.states[c] for c in self.offload)


def _positive_int(env: Mapping[str, str], name: str) -> Optional[int]:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    # Slurm writes GPU counts with a type prefix ("a100:8") and repeats with "(x2)".
    value = raw.split("(")[0].rsplit(":", 1)[-1]
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={raw!r} is not a positive integer; unset it or set it to the number of "
                         f"{'ranks' if name == 'WORLD_SIZE' else 'nodes or processes per node'}")
    return int(value)


def _first(env: Mapping[str, str], *names: str) -> Tuple[Optional[int], str]:
    for name in names:
        value = _positive_int(env, name)
        if value is not None:
            return value, name
    return None, ""


def resolve_world_size(env: Mapping[str, str] = os.environ) -> Tuple[int, str]:
    """(data-parallel ranks, where the number came from).

    WORLD_SIZE (what torchrun and the deepspeed launcher give each rank) wins; then the launchers'
    NNODES x NPROC_PER_NODE, each falling back to the Slurm allocation (nodes x GPUs per node);
    then the size of an mpirun job.
    """
    world = _positive_int(env, "WORLD_SIZE")
    if world is not None:
        return world, "WORLD_SIZE"
    nnodes, nodes_from = _first(env, "NNODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES")
    nproc, nproc_from = _first(env, "NPROC_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE")
    if nnodes is not None or nproc is not None:
        return ((nnodes or 1) * (nproc or 1),
                f"{nodes_from or 'nodes'}={nnodes or 1} x {nproc_from or 'processes per node'}={nproc or 1}")
    world = _positive_int(env, "OMPI_COMM_WORLD_SIZE")
    if world is not None:
        return world, "OMPI_COMM_WORLD_SIZE"
    return 1, "default; set WORLD_SIZE, or NNODES and NPROC_PER_NODE, to plan a multi-rank job"


def _stage_and_offload(run: RunConfig) -> Tuple[str, Tuple[str, ...], Dict]:
    """(stage, model-state categories offloaded to the host, the DeepSpeed zero_optimization section)."""
    if run.backend != "deepspeed":
        return run.backend, (), {}
    path = Path(run.deepspeed)
    if not path.is_file():
        raise ValueError(f"--deepspeed {run.deepspeed}: no such file (see ds_configs/)")
    zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if stage not in (1, 2, 3):
        raise ValueError(f"--deepspeed {run.deepspeed} has ZeRO stage {stage}; LISA on DeepSpeed needs stage "
                         "1, 2 or 3 (set zero_optimization.stage, or start from ds_configs/zero2.json)")

    def offloaded(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

    offload: Tuple[str, ...] = ()
    if offloaded("offload_optimizer"):
        offload += ("master", "optimizer_state")
    if stage == 3 and offloaded("offload_param"):
        offload += ("weights",)
    return f"zero{stage}", offload, zero


def _weight_bytes(run: RunConfig) -> Tuple[int, str]:
    """Bytes per weight on the target cluster, and why. `--dtype auto` means bf16 on GPUs: a dry run
    plans the GPU job even on a CPU login node (lisa-train sets DeepSpeed's bf16 from the same flag)."""
    if run.dtype == "fp32":
        return 4, "fp32 weights (--dtype fp32)"
    if run.dtype == "fp16":
        return 2, "fp16 weights (--dtype fp16)"
    return 2, "bf16 weights" + (" (--dtype auto on GPUs)" if run.dtype == "auto" else "")


def _model_config(run: RunConfig):
    """The model's config: a preset's, or read from a save_pretrained directory (only its config.json)
    or a hub id; no weights are downloaded."""
    import transformers

    from lisa_dist.recipe import presets

    if run.model in presets.PRESETS:
        return presets.PRESETS[run.model](presets.default_tokenizer())
    return transformers.AutoConfig.from_pretrained(run.model, trust_remote_code=run.trust_remote_code)


def _model_skeleton(run: RunConfig, config=None):
    """The model on the meta device: shapes and parameter names only, no storage, no download of weights."""
    import torch
    import transformers

    config = config if config is not None else _model_config(run)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=run.trust_remote_code)
    return model


def _first_switches(sampler: LayerSampler, lisa, intervals: int) -> Tuple[List[Tuple[int, int, Tuple[int, ...]]], str]:
    """The switches known before training, and a note for those that depend on data."""
    K, shown = lisa.interval_steps, min(intervals, SHOWN_SWITCHES)
    if lisa.sampling in ("uniform", "weighted"):
        return [(k, k * K, sampler.active_layers(k)) for k in range(shown)], ""
    if lisa.sampling == "outlier":
        return [], ("data-dependent: drawn with probabilities proportional to each layer's outlier ratio, "
                    f"measured on {lisa.calibration_batches} calibration batches per rank before step 0 "
                    f"(M={lisa.outlier_threshold:g})")
    # gradient: until every layer has trained once, each switch draws among the unvisited layers
    # only, which needs no statistics, so those switches are known now.
    schedule, unvisited = [], set(range(sampler.num_layers))
    for k in range(shown):
        if len(unvisited) < lisa.activated_layers:
            break
        layers = sampler.active_layers(k, [1.0 if i in unvisited else 0.0 for i in range(sampler.num_layers)])
        schedule.append((k, k * K, layers))
        unvisited -= set(layers)
    return schedule, (f"data-dependent from switch {len(schedule)} on: every layer trains once first, then p is "
                      f"proportional to exp({lisa.gradient_eta:g} * G^2 / mean G^2) of the gradient-norm moving "
                      f"average, with {lisa.exploration:g} spread uniformly")


def lora_adapter_params(model, rank: int) -> int:
    """Parameters LoRA adds at `rank` on every linear layer (nn.Linear, transformers' Conv1D) except the
    output embeddings, the modules PEFT's target_modules="all-linear" picks (peft 0.x,
    `_maybe_include_all_linear_layers`): A is rank x in, B is out x rank."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    total = 0
    for module in model.modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, Conv1D):  # weight is (in, out)
            total += rank * (module.weight.shape[0] + module.nf)
    return total


def lora_state_floor(stage: str, psi: int, adapter: int, world_size: int, weight_bytes: int) -> Dict[str, float]:
    """Per-rank model states of LoRA: frozen base weights in the run's dtype, and 16 bytes per adapter
    parameter (fp32 adapter or bf16 copy + fp32 master, its gradient, two Adam moments), sharded as the
    stage shards trainable parameters. It is the floor of a model with Psi + A parameters of which the
    A adapter ones train: the totals agree for PEFT's fp32 adapters (4 + 4 + 8) and for DeepSpeed's
    bf16 copies with fp32 masters (2 + 2 + 4 + 8); only the split between categories differs."""
    return model_state_floor(stage, psi + adapter, adapter, world_size, weight_bytes)


def build_plan(run: RunConfig, env: Mapping[str, str] = os.environ, device: str = "cuda",
               methods: Tuple[str, ...] = METHODS) -> DryRunPlan:
    """The dry run's numbers. `device` is where the planned job runs ("cuda", or "cpu" to check the
    plan against CPU runs: plan_memory.py says what differs); `methods` limits the traced peaks."""
    from lisa_dist.layers import split_parameters, tied_freeze_problem

    world, world_from = resolve_world_size(env)
    stage, offload, zero = _stage_and_offload(run)
    if stage == "single":
        world, world_from = 1, "--backend single"
    config = _model_config(run)
    model = _model_skeleton(run, config)
    problem = tied_freeze_problem(model, run.lisa)
    if problem:  # as lisa-train itself would refuse
        raise ValueError(problem)
    split = split_parameters(model, run.lisa)
    counts = count_params(split)
    sampler = LayerSampler(split.num_layers, run.lisa)  # raises if gamma exceeds the layer count
    psi_active = counts.gamma_active(run.lisa.activated_layers)
    weight_bytes, weights_desc = _weight_bytes(run)
    K = run.lisa.interval_steps
    intervals = math.ceil(run.steps / K)
    schedule, note = _first_switches(sampler, run.lisa, intervals)
    if run.dry_run_lora_rank < 1:
        raise ValueError(f"--dry-run-lora-rank must be >= 1, got {run.dry_run_lora_rank}")
    lora_params = lora_adapter_params(model, run.dry_run_lora_rank)
    gamma_layers = psi_active - counts.always

    def lisa_floor(at_stage: str) -> Dict[str, float]:
        always = always_active_cost(split, run.lisa, at_stage, world, weight_bytes)
        return lisa_state_floor(at_stage, counts.total, gamma_layers, always, world, weight_bytes)

    plan = DryRunPlan(
        model=run.model, architecture=type(model).__name__, layers_path=split.layers_path, counts=counts,
        psi_active=psi_active, world_size=world, world_size_source=world_from, stage=stage,
        weight_bytes=weight_bytes, weights_desc=weights_desc, offload=offload, intervals=intervals,
        schedule=schedule, schedule_note=note,
        full=model_state_floor(stage, counts.total, counts.total, world, weight_bytes),
        lisa=lisa_floor(stage),
        lora_rank=run.dry_run_lora_rank, lora_params=lora_params,
        lora=lora_state_floor(stage, counts.total, lora_params, world, weight_bytes),
        batch_size=run.batch_size, seq_len=run.max_length, gradient_checkpointing=run.gradient_checkpointing,
        device=device)
    engine = Engine(stage, world, weight_bytes, device, zero)
    for method in methods:
        plan.methods[method] = estimate_method(
            method, config, run.lisa, engine, batch_size=run.batch_size, seq_len=run.max_length,
            gradient_checkpointing=run.gradient_checkpointing, lora_rank=run.dry_run_lora_rank,
            lora_targets=run.dry_run_lora_targets, fp16=run.dtype == "fp16", trust_remote_code=run.trust_remote_code)
    if "lora" in plan.methods:
        # PEFT's own count on the chosen modules (equal to lora_adapter_params for all-linear).
        plan.lora_params = plan.methods["lora"].trainable
        plan.lora = lora_state_floor(stage, counts.total, plan.lora_params, world, weight_bytes)
    for other in ("zero1", "zero2", "zero3", "fsdp2"):
        plan.by_stage[other] = (model_state_floor(other, counts.total, counts.total, world, weight_bytes)["total"],
                                lisa_floor(other)["total"],
                                lora_state_floor(other, counts.total, plan.lora_params, world, weight_bytes)["total"])
    return plan


def _count(n: int) -> str:
    for suffix, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {suffix}"
    return str(n)


def _split(floor: Dict[str, float], offload: Tuple[str, ...]) -> Tuple[float, float]:
    host = sum(floor[c] for c in offload)
    return floor["total"] - host, host


def format_plan(plan: DryRunPlan, run: RunConfig) -> str:
    c = plan.counts
    gamma, K, seed = run.lisa.activated_layers, run.lisa.interval_steps, run.lisa.seed
    stage_desc = STAGE_NAMES[plan.stage] + (f" ({run.deepspeed})" if run.backend == "deepspeed" else "")
    if plan.offload:
        names = {"weights": "bf16 weight shards", "master": "fp32 master", "optimizer_state": "Adam moments"}
        stage_desc += ", offloaded to host: " + ", ".join(names[c] for c in plan.offload)
    unit = byte_unit(plan.full["total"])  # one unit for every figure; tiny test models read in KiB

    def cell(n: float) -> str:
        return f"{format_bytes(n, unit, 2, suffix=False):>8}"

    lines = [
        "lisa-train dry run: model skeleton on the meta device, no weights loaded, no processes started",
        f"model        {plan.model}: {plan.architecture}, {len(c.per_layer)} decoder layers at {plan.layers_path}",
        f"parameters   Psi = {c.total:,} ({_count(c.total)}); always-active {c.always:,}; "
        f"largest layer {max(c.per_layer):,}",
        f"             Psi_a = {plan.psi_active:,} ({_count(plan.psi_active)}, "
        f"{100 * plan.psi_active / c.total:.2f}% of Psi) with gamma={gamma}",
        f"             LoRA r={plan.lora_rank} on all linear layers but the head: {plan.lora_params:,} adapter "
        f"parameters ({100 * plan.lora_params / c.total:.2f}% of Psi), base weights frozen",
        f"world size   {plan.world_size} ({plan.world_size_source})",
        f"backend      {stage_desc}",
        f"precision    {plan.weights_desc}, {'fp32 master + ' if plan.weight_bytes == 2 else ''}fp32 Adam moments",
        "",
        f"model states per rank in {unit} (docs/design.md#memory-floors; activations and buffers not included)",
        f"{'':14}{'weights':>8} {'grads':>8} {'master':>8} {'Adam m+v':>8} {'total':>8}",
    ]
    rows = (("full FT", plan.full), (f"LISA g={gamma}", plan.lisa), (f"LoRA r={plan.lora_rank}", plan.lora))
    for name, floor in rows:
        lines.append(f"{name:14}" + " ".join(cell(floor[k]) for k in
                                           ("weights", "grads", "master", "optimizer_state", "total")))
    if plan.offload:
        for name, floor in rows:
            device, host = _split(floor, plan.offload)
            lines.append(f"  {name}: {format_bytes(device, unit, 2)} on the accelerator + "
                         f"{format_bytes(host, unit, 2)} host memory")
    lines.append(f"model states: LISA/full {plan.lisa['total'] / plan.full['total']:.3f}, "
                 f"LoRA/full {plan.lora['total'] / plan.full['total']:.3f}, "
                 f"LISA/LoRA {plan.lisa['total'] / plan.lora['total']:.3f}")
    if plan.world_size > 1:  # at one rank every stage is the same
        lines += ["", f"every stage at {plan.world_size} ranks ({unit} per rank, no offload)",
                  f"{'':14}{'full FT':>8} {'LISA':>8} {'LoRA':>8}"]
        for stage, (full, lisa, lora) in plan.by_stage.items():
            mark = "  <- this run" if stage == plan.stage else ""
            lines.append(f"{STAGE_NAMES[stage].replace('DeepSpeed ', ''):14}{cell(full)} {cell(lisa)} "
                         f"{cell(lora)}{mark}")
    lines += _peak_lines(plan, run)
    sampling = "" if run.lisa.sampling == "uniform" else f", sampling {run.lisa.sampling}"
    lines += ["", f"schedule (seed {seed}, gamma {gamma}, K {K}{sampling}): {plan.intervals} intervals over "
                  f"{run.steps} steps"]
    for k, step, layers in plan.schedule:
        lines.append(f"  switch {k} at step {step}: active layers {list(layers)}")
    if plan.schedule_note:
        lines.append(f"  {plan.schedule_note}")
    elif plan.intervals > len(plan.schedule):
        lines.append(f"  ... {plan.intervals - len(plan.schedule)} more")
    return "\n".join(lines)


PEAK_NAMES = {"full": "full FT", "lisa": "LISA g={gamma}", "lora": "LoRA r={rank}"}


def _peak_lines(plan: DryRunPlan, run: RunConfig) -> List[str]:
    if not plan.methods:
        return []
    unit = byte_unit(max(plan.peak(m) for m in plan.methods))

    def num(n: float, width: int) -> str:
        return f"{format_bytes(n, unit, 2, suffix=False):>{width}}"

    lisa = run.lisa
    trained = [w for w, on in (("embeddings", lisa.train_embeddings), ("head", lisa.train_head)) if on]
    where = "on the accelerator, " if plan.offload else ""
    lines = ["", f"peak per rank in {unit} {where}for a step of micro-batch {plan.batch_size} x {plan.seq_len} tokens, "
                 f"gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}",
             "  = model states between steps + what the step adds at its peak: activations and logits traced on the",
             f"  meta device, gradients, optimizer temporaries and {STAGE_NAMES[plan.stage]}'s buffers "
             "(lisa_dist/recipe/plan_memory.py)",
             f"{'':14}{'resident':>9} {'+ step':>8} {'= peak':>8}   {'activations':>11}  peak at",
             ]
    for method, estimate in ((m, plan.methods[m].peak) for m in METHODS if m in plan.methods):
        host = sum(estimate.states[c] for c in plan.offload)
        name = PEAK_NAMES[method].format(gamma=lisa.activated_layers, rank=plan.lora_rank)
        lines.append(f"{name:14}{num(estimate.resident - host, 9)} {num(estimate.rise, 8)} "
                     f"{num(plan.peak(method), 8)}   {num(estimate.activations, 11)}  {estimate.phase}")
    if "lisa" in plan.methods:
        layers = plan.methods["lisa"].traced_layers
        lines.append(f"  LISA traced with layers {list(layers)} active and {' and '.join(trained) or 'nothing'} "
                     "always trained: the costliest switch")
    if any(plan.methods[m].peak.math_attention for m in plan.methods):
        lines.append("  note: attention ran through the math path (S x S probabilities kept), so activations are an "
                     "upper bound; the model does not dispatch through transformers' attention interface")
    if "lisa" in plan.methods and "lora" in plan.methods:
        ratio = f"LISA / LoRA = {plan.peak('lisa') / plan.peak('lora'):.2f}"
        if "full" in plan.methods:
            ratio += f"    (LISA / full = {plan.peak('lisa') / plan.peak('full'):.2f}, peaks per rank)"
        lines.append(ratio)
    return lines


def dry_run_report(run: RunConfig, env: Mapping[str, str] = os.environ) -> str:
    return format_plan(build_plan(run, env), run)
