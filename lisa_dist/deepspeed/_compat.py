"""Every private DeepSpeed access of the LISA engine hook, in one place, behind a version pin.

The hook rebuilds DeepSpeed's ZeRO optimizer in place at each switch, which no public API offers.
The attributes used here were read in DeepSpeed 0.19.8 (DESIGN.md section 5); a release outside
the tested range may rename or restructure them, so the hook refuses it with a clear message rather
than corrupting training silently. Widen SUPPORTED (and setup.py) only after the distributed tests
pass on the new release.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Dict, List

import torch
from packaging.version import Version

SUPPORTED = ">=0.19.8,<0.20"
_MIN, _MAX = Version("0.19.8"), Version("0.20")


def check_deepspeed_version(installed: str | None = None) -> None:
    """Raise RuntimeError unless the installed DeepSpeed is in the tested range."""
    if installed is None:
        import deepspeed
        installed = deepspeed.__version__
    # DeepSpeed source builds append "+<git hash>"; the release is what matters.
    release = Version(Version(installed).base_version)
    if not _MIN <= release < _MAX:
        raise RuntimeError(
            f"lisa_dist's DeepSpeed hook is tested with deepspeed{SUPPORTED} but deepspeed {installed} is "
            f"installed. It rebuilds ZeRO optimizer internals that change between releases; install a "
            f"supported version (pip install 'deepspeed{SUPPORTED}') or use --backend fsdp2")


# --- engine ---------------------------------------------------------------------------------------

def configure_optimizer(engine, basic_optimizer: torch.optim.Optimizer) -> None:
    """Build a fresh ZeRO optimizer around `basic_optimizer` and install it as engine.optimizer
    (engine.py:2328-2367), then re-register the torch-style backward post hook that engine __init__
    registers only once (engine.py:772)."""
    engine._configure_optimizer(basic_optimizer, None)
    if engine._support_torch_style_backward:
        engine.optimizer.register_grad_acc_post_hook(engine._backward_post_hook)


def drop_engine_optimizer(engine) -> None:
    """Forget the ZeRO optimizer so its flat buffers can be freed. engine.basic_optimizer and
    engine.client_optimizer are kept: the hook re-fills that same torch optimizer object (so LR
    schedulers bound to it stay valid), and after its groups and state are cleared it references
    nothing of the old layout."""
    engine.optimizer = None


# --- ZeRO-1/2 optimizer (runtime/zero/stage_1_and_2.py) ----------------------------------------

def zero12_optimizer_class():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    return DeepSpeedZeroOptimizer


def fp32_partitions(zero_optimizer) -> List[torch.Tensor]:
    """This rank's fp32 master partition per param group (stage_1_and_2.py:560)."""
    return zero_optimizer.single_partition_of_fp32_groups


def bit16_groups(zero_optimizer) -> List[List[torch.nn.Parameter]]:
    """The model params each group flattened (only those trainable when it was built, 423-434)."""
    return zero_optimizer.bit16_groups


def flat_bit16_buffers(zero_optimizer) -> List[torch.Tensor]:
    """The flat buffers the trainable params' .data view into (534, 889-899)."""
    return zero_optimizer.bit16_groups_flat


def destroy_zero12(zero_optimizer) -> None:
    """Remove grad hooks and hp mappings (753-767). The caller must already have moved every param
    out of the flat buffers."""
    zero_optimizer.destroy()
    # destroy() keeps the post hooks, which reference the engine's bound method.
    zero_optimizer.unregister_grad_acc_post_hooks()


def gradient_buffers(zero_optimizer) -> Dict[str, List[torch.Tensor]]:
    """Gradient storage owned by the ZeRO optimizer, by kind.

    "partition": gradients of this rank's partition (ZeRO-2's contiguous `grads_in_partition`, the
    reduced `averaged_gradients`); "buckets": reduction staging buffers (`ipg_buckets`, sized by
    reduce_bucket_size, a framework workspace rather than a model state).
    """
    partition: List[torch.Tensor] = []
    if getattr(zero_optimizer, "grads_in_partition", None) is not None:
        partition.append(zero_optimizer.grads_in_partition)
    for grads in zero_optimizer.averaged_gradients.values():
        if grads is None:
            continue
        partition.extend(grads if isinstance(grads, (list, tuple)) else [grads])
    buckets: List[torch.Tensor] = []
    for bucket in zero_optimizer.ipg_buckets.values():
        buckets.extend(bucket.buffer)
        buckets.extend(g for g in bucket.grads if torch.is_tensor(g))
    return {"partition": [t for t in partition if torch.is_tensor(t)], "buckets": buckets}


def checkpoint_safe_globals() -> List:
    """Non-tensor objects DeepSpeed pickles into its checkpoint files. They are plain data (enums, a
    dataclass of two ints, the loss scaler's attributes), safe to allow in weights-only loads."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextmanager
def quiet_logs():
    """A rebuild repeats DeepSpeed's init-time INFO lines on rank 0; keep them out of training logs."""
    from deepspeed.utils import logger
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def load_ds_config(config) -> dict:
    """A DeepSpeed config given as a dict, a JSON/HJSON path or base64, read as DeepSpeed reads it."""
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config as _load
    return _load(config)


# --- ZeRO-3 optimizer (runtime/zero/stage3.py, parameter_offload.py) -----------------------------

def zero3_optimizer_class():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    return DeepSpeedZeroOptimizer_Stage3


def zero3_fp32_partitions(zero_optimizer) -> List[torch.Tensor]:
    """This rank's fp32 master partition per sub-group (stage3.py:1081-1208). DeepSpeed cuts each
    param group into sub-groups of at most sub_group_size elements, so a group may have several."""
    return zero_optimizer.fp32_partitioned_groups_flat


def zero3_sub_group_sources(zero_optimizer) -> List[int]:
    """For each sub-group, the index of the torch optimizer param group it came from."""
    return [zero_optimizer.sub_group_to_group_id[i] for i in range(len(zero_optimizer.fp16_groups))]


def zero3_trainable_params(zero_optimizer) -> List[torch.nn.Parameter]:
    """The params the stage-3 optimizer owns (those trainable when it was built, 726-749)."""
    return [p for group in zero_optimizer.fp16_groups for p in group]


def zero3_parameter_offload(zero_optimizer):
    """The DeepSpeedZeRoOffload object: it partitioned the model and owns its module hooks and the
    gather coordinator; every stage-3 optimizer of an engine must share it."""
    return zero_optimizer.parameter_offload


def zero3_module_hook_count(parameter_offload) -> int:
    """Forward and backward module hooks DeepSpeedZeRoOffload registered (parameter_offload.py)."""
    return len(parameter_offload.forward_hooks) + len(parameter_offload.backward_hooks)


def _defragment_in_place(tensors: List[torch.Tensor]) -> torch.Tensor:
    """DeepSpeed's defragment (runtime/zero/utils.py:215) without its host round trip and
    gc.collect(): one flat buffer on the tensors' device, each tensor re-pointed into it."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for t in tensors:
        n = t.numel()
        flat.narrow(0, offset, n).copy_(t)
        t.data = flat.narrow(0, offset, n)
        offset += n
    return flat


@contextmanager
def zero3_rebuild_context(parameter_offload):
    """While active, a new stage-3 optimizer reuses `parameter_offload` and builds its flat bf16
    buffer without DeepSpeed's defragmentation pass. Both are class/module attributes swapped for
    the duration of one synchronous optimizer construction.

    - DeepSpeedZeroOptimizer_Stage3.__init__ calls initialize_ds_offload (603-641), which would
      build a second DeepSpeedZeRoOffload and register a second set of module hooks on top of the
      first.
    - defragment copies the trainable partitions to the host, runs gc.collect() and copies them
      back, to de-fragment a device filled by model init. At a switch only the active set's
      partitions move (2 Psi_a / N bytes) and the full collection alone took ~1 s per switch here
      (it scales with the number of live Python objects, not with the model)."""
    from deepspeed.runtime.zero import stage3
    cls = zero3_optimizer_class()
    original_offload = cls.__dict__["initialize_ds_offload"]
    original_defragment = stage3.defragment
    cls.initialize_ds_offload = lambda self, *args, **kwargs: parameter_offload
    stage3.defragment = _defragment_in_place
    try:
        yield
    finally:
        cls.initialize_ds_offload = original_offload
        stage3.defragment = original_defragment


def zero3_lp_buffers(zero_optimizer) -> List[torch.Tensor]:
    """The flat bf16 buffers the trainable params' partitions view: lp_param_buffer (913-1018), or
    the host buffers per param group under offload_param (888-911)."""
    out = list(zero_optimizer.param_groups_fp16_flat_cpu_memory)
    if getattr(zero_optimizer, "lp_param_buffer", None) is not None:
        out.insert(0, zero_optimizer.lp_param_buffer)
    return out


def zero3_flat_buffers(zero_optimizer) -> List[torch.Tensor]:
    """Buffers sized by the trainable set that must die with the optimizer: the bf16 partitions'
    flat buffer (lp_param_buffer, or the host buffers under offload_param), the gradient partitions,
    and the fp32 partitions with their offload gradient buffers."""
    out = zero3_lp_buffers(zero_optimizer)
    if getattr(zero_optimizer, "grad_partitions_flat_buffer", None) is not None:
        out.append(zero_optimizer.grad_partitions_flat_buffer)
    for fp32 in zero_optimizer.fp32_partitioned_groups_flat:
        out.append(fp32)
        if fp32.grad is not None:
            out.append(fp32.grad)
    return out


def clone_keeping_pinned(t: torch.Tensor) -> torch.Tensor:
    """A copy in its own storage, page-locked if `t` was: offload_param shards live in pinned host
    memory so their host<->device copies can be asynchronous, and a plain clone() would make every
    layer that was ever active fall back to slow synchronous copies."""
    if not t.is_pinned():
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


@contextmanager
def keep_peak_memory_stats():
    """DeepSpeed's runtime.utils.empty_cache(), which ZeRO-1/2's optimizer constructor calls, also
    resets the accelerator's peak-memory statistics: a rebuild would hide its own transient (and
    every peak before it) from max_memory_allocated(). While rebuilding, it only empties the cache."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime import utils
    from deepspeed.runtime.zero import stage_1_and_2

    def empty_cache_only():
        get_accelerator().empty_cache()

    saved = utils.empty_cache, stage_1_and_2.empty_cache
    utils.empty_cache = stage_1_and_2.empty_cache = empty_cache_only
    try:
        yield
    finally:
        utils.empty_cache, stage_1_and_2.empty_cache = saved


def detach_zero3(zero_optimizer) -> None:
    """Unhook a stage-3 optimizer from the model so that it, and every buffer sized by its trainable
    set, can be freed, while the parameter partitioning and module hooks stay (unlike destroy(),
    539-550, which also removes the DeepSpeedZeRoOffload hooks the next optimizer needs)."""
    from deepspeed.accelerator import get_accelerator

    # As destroy() does: reduction and offload streams may still be using the buffers freed below.
    get_accelerator().synchronize()
    for hook in zero_optimizer._grad_acc_hooks:
        hook.remove()
    for hook in zero_optimizer._leaf_module_hooks:
        hook.remove()
    zero_optimizer._grad_acc_hooks = []
    zero_optimizer._leaf_module_hooks = []
    zero_optimizer.unregister_grad_acc_post_hooks()
    zero_optimizer._clear_muon_allgather_buffers()
    zero_optimizer.ipg_buckets.clear()
    zero_optimizer._unpin_offload_buffers()
    # The partitions of the params this optimizer owned are views into its flat bf16 buffer
    # (defragment, 913-1018); give each its own storage so the buffer can go.
    with torch.no_grad():
        for p in zero3_trainable_params(zero_optimizer):
            p.ds_tensor.data = clone_keeping_pinned(p.ds_tensor.data)
            p.grad = None
    # The optimizer sits in reference cycles (its zenflow hooks are partials bound to it, 583-601),
    # so it dies only at a full gc.collect(), which costs ~1 s in a process with transformers
    # loaded. Drop its buffers now; the empty shell goes with the next automatic collection.
    for fp32 in zero_optimizer.fp32_partitioned_groups_flat:
        fp32.grad = None
    zero_optimizer.fp32_partitioned_groups_flat = []
    zero_optimizer.next_swappable_fp32_partitioned_groups = []
    zero_optimizer.fp16_partitioned_groups_flat = []
    zero_optimizer.param_groups_fp16_flat_cpu_memory = []
    zero_optimizer.lp_param_buffer = None
    zero_optimizer.grad_partitions_flat_buffer = None
    zero_optimizer._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition = {}
    zero_optimizer.averaged_gradients = {}


def invalidate_gather_trace(zero_optimizer) -> None:
    """Make the parameter coordinator record a fresh module trace at the next forward. The trace
    is already invalid before the first forward (e.g. a rebuild on resume), where
    _invalidate_trace raises instead of doing nothing (partitioned_param_coordinator.py:195)."""
    coordinator = zero_optimizer.parameter_offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()


def zero3_gradient_buffers(zero_optimizer) -> Dict[str, List[torch.Tensor]]:
    """Gradient storage of a stage-3 optimizer, by kind (as gradient_buffers for ZeRO-1/2):
    "partition": the reduced gradient partitions (grad_partitions_flat_buffer; under
    offload_optimizer the fp32 partitions' .grad on the host); "buckets": reduction staging."""
    partition: List[torch.Tensor] = []
    if getattr(zero_optimizer, "grad_partitions_flat_buffer", None) is not None:
        partition.append(zero_optimizer.grad_partitions_flat_buffer)
    partition.extend(fp32.grad for fp32 in zero_optimizer.fp32_partitioned_groups_flat if fp32.grad is not None)
    buckets: List[torch.Tensor] = []
    for bucket in zero_optimizer.ipg_buckets.values():
        if getattr(bucket, "buffer", None) is not None:
            buckets.append(bucket.buffer)
    return {"partition": partition, "buckets": buckets}


def zero3_consolidated_state_dict(engine) -> Dict[str, torch.Tensor] | None:
    """The full 16-bit state dict on rank 0 (None elsewhere), gathered one module at a time
    (engine.py:5631). Collective: every rank must call it."""
    return engine._zero3_consolidated_16bit_state_dict()


# --- importance statistics (sampling="gradient" / "outlier") --------------------------------------

def zero12_grad_partitions(zero_optimizer, group_index: int) -> List[torch.Tensor]:
    """This rank's reduced gradient partition of param group `group_index`, as tensors, between the
    gradient reduction and the step (`averaged_gradients`, stage_1_and_2.py:1047-1085; what its own
    clipping norm reads, scaled_global_norm). Disjoint across ranks; padding is zero."""
    grads = zero_optimizer.averaged_gradients.get(group_index)
    if grads is None:
        return []
    flat = getattr(grads, "flat_partition", None)  # the pre-flattened variant (stage_1_and_2.py:2904)
    if flat is not None:
        return [flat]
    if torch.is_tensor(grads):
        return [grads]
    return [g for g in grads if g is not None]


def zero3_local_weight(param: torch.nn.Parameter):
    """(this rank's flat partition of a ZeRO-3 parameter, the flat index of its first element, the
    number of real elements in it): `ds_tensor` holds elements [rank * size, (rank + 1) * size) of
    the flattened full tensor, the last rank's tail being padding (partition_parameters.py)."""
    import torch.distributed as dist

    local = param.ds_tensor
    size = local.ds_numel if hasattr(local, "ds_numel") else local.numel()
    start = dist.get_rank() * size
    return local, start, max(0, min(size, param.ds_numel - start))
