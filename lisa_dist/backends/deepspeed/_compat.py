"""Every private DeepSpeed access of the LISA engine hook, in one place, each behind a probe.

The hook rebuilds DeepSpeed's ZeRO optimizer in place at each switch, which no public API offers.
The attributes used here were read in DeepSpeed 0.19.8 (docs/design.md#deepspeed-internals) and
are tested on the releases lisa_dist/versions.py lists. Outside them the hook warns once and goes
on; it refuses only when a probe of an attribute, signature or behaviour it relies on fails
(`check_deepspeed` at first use, `check_engine` on the first engine built), naming what is missing.

Releases before 0.19 take the fixes below: zero12_build_fixes (2+ ranks fail without it),
install_zero2_accumulation_fix (0.17's ZeRO-2 applies the last micro-batch's gradient only),
install_zero3_gather_fix (ZeRO-3 gathers are sometimes read before they arrive).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Dict, List

import torch
from packaging.version import Version

from lisa_dist.versions import Probe, check_release, has_signature, require, require_attrs


def _release() -> Version:
    import deepspeed
    return Version(Version(deepspeed.__version__).base_version)


def _module_probes() -> List[Probe]:
    from deepspeed.runtime import engine, utils
    from deepspeed.runtime.zero import partition_parameters, stage3, stage_1_and_2

    zero12, zero3 = zero12_optimizer_class, zero3_optimizer_class
    probes = [
        Probe("deepspeed.runtime.engine.DeepSpeedEngine._configure_optimizer(client_optimizer, model_parameters)",
              lambda: has_signature(engine.DeepSpeedEngine._configure_optimizer, "client_optimizer",
                                    "model_parameters")),
        Probe("deepspeed.runtime.engine.DeepSpeedEngine._zero3_consolidated_16bit_state_dict",
              lambda: callable(engine.DeepSpeedEngine._zero3_consolidated_16bit_state_dict)),
        Probe("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.destroy",
              lambda: callable(zero12().destroy)),
        Probe("deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3.initialize_ds_offload",
              lambda: "initialize_ds_offload" in zero3().__dict__),
        Probe("deepspeed.runtime.zero.stage3.defragment (or DeepSpeedZeroOptimizer_Stage3.defragment)",
              lambda: hasattr(stage3, "defragment") or "defragment" in zero3().__dict__),
        Probe("deepspeed.runtime.zero.stage3.see_memory_usage", lambda: callable(stage3.see_memory_usage)),
        Probe("deepspeed.runtime.utils.empty_cache", lambda: callable(utils.empty_cache)),
        Probe("deepspeed.runtime.zero.stage_1_and_2.empty_cache", lambda: callable(stage_1_and_2.empty_cache)),
        Probe("deepspeed.comm.comm.cdb", lambda: hasattr(__import__("deepspeed.comm.comm", fromlist=["cdb"]), "cdb")),
        Probe("deepspeed.comm.torch.TorchBackend.get_all_gather_function (sets TorchBackend.all_gather_function)",
              lambda: callable(_torch_backend_class().get_all_gather_function)),
        Probe("deepspeed.runtime.zero.partition_parameters.Init", lambda: isinstance(partition_parameters.Init, type)),
        Probe("deepspeed checkpoint types (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)",
              lambda: len(checkpoint_safe_globals()) == 4),
    ]
    if _release() < Version("0.19"):  # only the pre-0.19 fixes touch these
        probes += [
            Probe("deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.flatten_dense_tensors_aligned",
                  lambda: "flatten_dense_tensors_aligned" in zero12().__dict__, last_seen="0.18.9"),
            Probe("deepspeed.runtime.zero.partition_parameters.Init._allgather_params_coalesced",
                  lambda: "_allgather_params_coalesced" in partition_parameters.Init.__dict__, last_seen="0.18.9"),
            Probe("deepspeed.runtime.zero.stage_1_and_2.see_memory_usage",
                  lambda: callable(stage_1_and_2.see_memory_usage), last_seen="0.18.9"),
        ]
    if Version("0.17") <= _release() < Version("0.18"):
        probes.append(Probe("DeepSpeedZeroOptimizer.independent_gradient_partition_epilogue",
                            lambda: "independent_gradient_partition_epilogue" in zero12().__dict__, last_seen="0.17.6"))
    return probes


def check_deepspeed() -> None:
    """At the hook's first use: one warning outside the tested DeepSpeed and torch releases; refuse
    only when a probe of DeepSpeed's internals fails."""
    import deepspeed
    check_release("deepspeed", deepspeed.__version__)
    check_release("torch", torch.__version__)
    require("deepspeed", "deepspeed-modules", _module_probes())


_ZERO12_ATTRS = ("bit16_groups", "bit16_groups_flat", "single_partition_of_fp32_groups", "averaged_gradients")
_ZERO3_ATTRS = ("fp32_partitioned_groups_flat", "fp16_groups", "fp16_partitioned_groups_flat", "sub_group_to_group_id",
                "parameter_offload", "_grad_acc_hooks", "_leaf_module_hooks", "param_groups_fp16_flat_cpu_memory",
                "averaged_gradients")


def check_engine(engine) -> None:
    """On the first engine built, once per ZeRO stage: the instance attributes the rebuild reads."""
    stage = int(engine.zero_optimization_stage())
    optimizer = engine.optimizer
    label = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
    attrs = (_ZERO3_ATTRS if stage == 3 else _ZERO12_ATTRS) + _LOSS_SCALE_ATTRS
    require_attrs("deepspeed", optimizer, label, attrs, key=f"deepspeed-{label}")
    if stage == 3:
        offload = optimizer.parameter_offload
        require_attrs("deepspeed", offload, "DeepSpeedZeRoOffload", ("forward_hooks", "backward_hooks",
                                                                     "get_param_coordinator"))
        require_attrs("deepspeed", offload.get_param_coordinator(), "PartitionedParameterCoordinator",
                      ("_invalidate_trace", "is_invalid_trace"))
    if supports_torch_style_backward(engine):
        require_attrs("deepspeed", engine, "DeepSpeedEngine", ("_backward_post_hook",),
                      key="deepspeed-torch-style-backward")


@contextmanager
def zero12_build_fixes():
    """While active, ZeRO-1/2 optimizers are built as DeepSpeed 0.19 builds them.

    Before 0.19 the flat buffer of a param group is the torch.cat of params that require grad,
    recorded by autograd (stage_1_and_2.py flatten_dense_tensors_aligned), and its partitions are
    split views of it; with torch 2.13 the gloo all-gather into those views after each step then
    fails ("Output 0 of Split is a view and is being modified inplace") on 2+ ranks, with or without
    LISA. DeepSpeed 0.19 detaches the buffer; this does the same for older releases.

    0.17's constructor also calls see_memory_usage(force=True) three times, each a gc.collect() on
    rank 0 before logging (0.18 and 0.19 call none): at every switch that made the 0.17 ZeRO-1/2
    checks run four times longer. Those reports are dropped here."""
    from deepspeed.runtime.zero import stage_1_and_2
    cls = zero12_optimizer_class()
    original = cls.__dict__["flatten_dense_tensors_aligned"]
    original_report = stage_1_and_2.see_memory_usage
    if _release() >= Version("0.19"):
        yield
        return

    def detached(self, *args, **kwargs):
        return original(self, *args, **kwargs).detach()

    cls.flatten_dense_tensors_aligned = detached
    stage_1_and_2.see_memory_usage = lambda *args, **kwargs: None
    try:
        yield
    finally:
        cls.flatten_dense_tensors_aligned = original
        stage_1_and_2.see_memory_usage = original_report


class _GatherRecorder:
    """deepspeed.comm as partition_parameters sees it, keeping every asynchronous all-gather's handle."""

    def __init__(self, comm):
        self._comm = comm
        self.handles = []

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def _record(self, name, *args, **kwargs):
        handle = getattr(self._comm, name)(*args, **kwargs)
        if kwargs.get("async_op") and handle is not None:
            self.handles.append(handle)
        return handle

    def all_gather_into_tensor(self, *args, **kwargs):
        return self._record("all_gather_into_tensor", *args, **kwargs)

    def all_gather(self, *args, **kwargs):
        return self._record("all_gather", *args, **kwargs)


def install_zero3_gather_fix() -> None:
    """Process-wide and idempotent: before 0.19, make ZeRO-3's blocking gather of several params wait
    for every one of them.

    Init._allgather_params_coalesced (partition_parameters.py; what GatheredParameters and the 16-bit
    consolidated save behind the runner's save_pretrained run) launches one asynchronous all-gather per
    param and waits on the last handle only, counting on a CUDA stream to order them. gloo handles
    are independent and the CPU synchronize() after it is a no-op, so on CPU the caller reads the
    gathered buffers (torch.empty) while earlier all-gathers are still filling them: whole weights
    come back as garbage now and then (1.7e38, 3.7e19 in a plain DeepSpeed 0.18.9 ZeRO-3 run without
    LISA; never on 0.19.8, which waits on every handle). This waits on every handle the original
    launched, after it returns and before anyone reads the params."""
    if _release() >= Version("0.19"):
        return
    from deepspeed.runtime.zero import partition_parameters
    cls = partition_parameters.Init
    original = cls.__dict__["_allgather_params_coalesced"]
    if getattr(original, "_lisa_waits_on_every_gather", False):
        return

    def waits_on_every_gather(self, *args, **kwargs):
        comm = partition_parameters.dist
        recorder = partition_parameters.dist = _GatherRecorder(comm)
        try:
            result = original(self, *args, **kwargs)
        finally:
            partition_parameters.dist = comm
        for handle in recorder.handles:
            handle.wait()
        return result

    waits_on_every_gather._lisa_waits_on_every_gather = True
    waits_on_every_gather.__wrapped__ = original
    cls._allgather_params_coalesced = waits_on_every_gather


def _torch_backend_class():
    from deepspeed.comm.torch import TorchBackend
    return TorchBackend


class _Works:
    """The handle of several asynchronous collectives: waits on every one."""

    def __init__(self, works):
        self._works = [w for w in works if w is not None]

    def wait(self, timeout=None) -> bool:
        for work in self._works:
            work.wait()
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self._works)


def gloo_all_gather_in_place(output_tensor: torch.Tensor, input_tensor: torch.Tensor, group=None,
                             async_op: bool = False):
    """torch.distributed.all_gather_into_tensor for contiguous CPU tensors on a gloo group, as one
    broadcast per rank straight into that rank's slice of `output_tensor`.

    gloo's own all-gather (ProcessGroupGloo::allgather, behind all_gather_into_tensor) receives into
    a second tensor of the output's size and copies it out, so every ZeRO-3 gather of a parameter on
    CPU peaked at twice the whole parameter: 2 x 94 MiB for a 32000 x 768 fp32 LM head or embedding
    (scratch measurement: VmHWM +190 MiB for a 93 MiB output, +94 MiB with broadcasts)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = output_tensor.view(-1)
    n = input_tensor.numel()
    rank = dist.get_rank(group)
    mine = out.narrow(0, rank * n, n)
    if mine.data_ptr() != input_tensor.data_ptr():  # ZeRO-3 often passes its own slice of the output
        mine.copy_(input_tensor.view(-1))
    works = [dist.broadcast(out.narrow(0, r * n, n), src=r if group is None else dist.get_global_rank(group, r),
                            group=group, async_op=async_op) for r in range(world)]
    return _Works(works) if async_op else None


def install_gloo_all_gather_in_place() -> None:
    """Process-wide and idempotent, once deepspeed.comm is initialised: DeepSpeed's all-gathers into
    a flat tensor (ZeRO-3 parameter fetches, ZeRO-1/2 partitions after a step) run as
    `gloo_all_gather_in_place` where they would run on gloo with contiguous CPU tensors of one
    dtype; anything else (NCCL, CUDA tensors, other shapes) goes to torch's all_gather_into_tensor as
    before. The data moved and its result are the same; the gloo-side copy of the output is gone.
    Reaches `TorchBackend.all_gather_function` (deepspeed/comm/torch.py, 0.17-0.19), which every
    `deepspeed.comm.all_gather_into_tensor` / `allgather_fn` calls."""
    import torch.distributed as dist
    from deepspeed.comm import comm as ds_comm  # the module: the package's `cdb` is a stale None

    backend = ds_comm.cdb
    if not isinstance(backend, _torch_backend_class()):  # another communication backend (oneCCL): left alone
        return
    require_attrs("deepspeed", backend, "TorchBackend", ("all_gather_function",), key="deepspeed-TorchBackend")
    original = backend.all_gather_function
    if getattr(original, "_lisa_in_place", False):
        return

    def all_gather(output_tensor, input_tensor, group=None, async_op=False):
        if (output_tensor.device.type == "cpu" and input_tensor.device.type == "cpu"
                and output_tensor.dtype == input_tensor.dtype and output_tensor.is_contiguous()
                and input_tensor.is_contiguous()
                and output_tensor.numel() == input_tensor.numel() * dist.get_world_size(group)
                and dist.get_backend(group) == "gloo"):
            return gloo_all_gather_in_place(output_tensor, input_tensor, group=group, async_op=async_op)
        return original(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)

    all_gather._lisa_in_place = True
    all_gather.__wrapped__ = original
    backend.all_gather_function = all_gather


def install_zero2_accumulation_fix() -> None:
    """Process-wide and idempotent: on 0.17, make ZeRO-2 accumulate gradients over micro-batches.

    DeepSpeed 0.17's independent_gradient_partition_epilogue (stage_1_and_2.py), which ZeRO-2 runs
    after every micro-batch's backward, keeps the running sum in `all_grad_tensors` but decides
    between starting and adding to it by looking at `averaged_gradients`, which it only fills at the
    accumulation boundary. Every micro-batch therefore starts the sum afresh, and the step applies
    the last micro-batch's gradient only (a plain DeepSpeed 0.17.6 ZeRO-2 engine with
    gradient_accumulation_steps=2 and no LISA ends a mean 4e-7 from AdamW on the last micro-batches
    and 1.5e-3 from AdamW on all of them; benchmarks/ds_release_fixes.py). 0.16 fills both per micro-batch; 0.18 tests
    `all_grad_tensors`, which is what this does: a group with a running sum is marked in
    `averaged_gradients` for the duration of the call, and unmarked after it unless the boundary
    replaced the mark with the real partition."""
    if not Version("0.17") <= _release() < Version("0.18"):
        return
    cls = zero12_optimizer_class()
    original = cls.__dict__["independent_gradient_partition_epilogue"]
    if getattr(original, "_lisa_accumulates", False):
        return

    def accumulating_epilogue(self):
        marks = {i: grads for i, grads in self.all_grad_tensors.items()
                 if grads is not None and self.averaged_gradients.get(i) is None}
        had_key = {i: (i in self.averaged_gradients) for i in marks}
        self.averaged_gradients.update(marks)
        try:
            return original(self)
        finally:
            for i, grads in marks.items():
                if self.averaged_gradients.get(i) is grads:
                    if had_key[i]:
                        self.averaged_gradients[i] = None
                    else:
                        del self.averaged_gradients[i]

    accumulating_epilogue._lisa_accumulates = True
    accumulating_epilogue.__wrapped__ = original
    cls.independent_gradient_partition_epilogue = accumulating_epilogue


# --- engine ---------------------------------------------------------------------------------------

def configure_optimizer(engine, basic_optimizer: torch.optim.Optimizer) -> None:
    """Build a fresh ZeRO optimizer around `basic_optimizer` and install it as engine.optimizer
    (engine.py:2328-2367), then re-register the torch-style backward post hook that engine __init__
    registers only once (engine.py:772).

    The optimizer is handed over as a client optimizer, which under offload_optimizer DeepSpeed
    refuses unless it is DeepSpeedCPUAdam (zero_force_ds_cpu_optimizer, engine.py:2342). That
    refusal already ran (or was waived by the config) when the engine was built over the same
    optimizer type, e.g. torch's AdamW from "torch_adam": true; it is skipped for the rebuild."""
    engine.zero_force_ds_cpu_optimizer = lambda: False
    try:
        with zero12_build_fixes():
            engine._configure_optimizer(basic_optimizer, None)
    finally:
        del engine.zero_force_ds_cpu_optimizer
    if supports_torch_style_backward(engine):
        engine.optimizer.register_grad_acc_post_hook(engine._backward_post_hook)


def supports_torch_style_backward(engine) -> bool:
    """Whether a plain loss.backward() drives this engine (0.18+); before, only engine.backward."""
    return bool(getattr(engine, "_support_torch_style_backward", False))


_LOSS_SCALE_ATTRS = ("loss_scaler", "dynamic_loss_scale", "custom_loss_scaler", "external_loss_scale")


def loss_scale_state(zero_optimizer) -> Dict[str, object]:
    """The loss scaling of a ZeRO-1/2/3 optimizer: its LossScaler/DynamicLossScaler object (scale,
    iteration, last overflow, hysteresis), and an override_loss_scale() value. A new optimizer
    starts a fresh scaler at initial_scale_power; handing it this one continues the scale window."""
    return {name: getattr(zero_optimizer, name) for name in _LOSS_SCALE_ATTRS}


def set_loss_scale_state(zero_optimizer, state: Dict[str, object]) -> None:
    for name, value in state.items():
        setattr(zero_optimizer, name, value)


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
    if hasattr(zero_optimizer, "unregister_grad_acc_post_hooks"):  # >= 0.18
        zero_optimizer.unregister_grad_acc_post_hooks()
    # Under offload_optimizer each param links back to its optimizer (_create_optimizer_mapping,
    # 0.17+), which destroy() leaves: the old optimizer and its flat buffers would outlive it.
    for group in zero_optimizer.bit16_groups:
        for p in group:
            if hasattr(p, "_zero_optimizer"):
                del p._zero_optimizer


def gradient_buffers(zero_optimizer) -> Dict[str, List[torch.Tensor]]:
    """Gradient storage owned by the ZeRO optimizer, by kind.

    "partition": gradients of this rank's partition (ZeRO-2's contiguous `grads_in_partition`, the
    reduced `averaged_gradients`; under offload_optimizer the fp32 partitions' .grad on the host,
    stage_1_and_2.py:3126, and the fp32 host accumulators of gradient accumulation); "buckets":
    reduction and offload staging buffers (`ipg_buckets`, sized by reduce_bucket_size; under
    offload the largest-param gradient buffers and the host bit16 copy of the partition the
    updated weights travel back through, 560-575), framework workspace rather than model state.
    """
    partition: List[torch.Tensor] = []
    if getattr(zero_optimizer, "grads_in_partition", None) is not None:
        partition.append(zero_optimizer.grads_in_partition)
    for grads in zero_optimizer.averaged_gradients.values():
        if grads is None:
            continue
        partition.extend(grads if isinstance(grads, (list, tuple)) else [grads])
    partition.extend(fp32.grad for fp32 in zero_optimizer.single_partition_of_fp32_groups if fp32.grad is not None)
    buckets: List[torch.Tensor] = []
    # 0.17-0.19 keep per-dtype IPG buckets; 0.16 one flat list of buffers.
    for bucket in getattr(zero_optimizer, "ipg_buckets", {}).values():
        buckets.extend(bucket.buffer)
        buckets.extend(g for g in bucket.grads if torch.is_tensor(g))
    buckets.extend(getattr(zero_optimizer, "ipg_buffer", None) or [])
    if getattr(zero_optimizer, "cpu_offload", False):
        buckets.extend(getattr(zero_optimizer, name, None) for name in
                       ("temp_grad_buffer_for_cpu_offload", "temp_grad_buffer_for_gpu_offload"))
        buckets.extend(getattr(zero_optimizer, "param_buffer_of_bit16_for_cpu_offload_groups", []))
        # gradient accumulation across micro-batches, fp32 on the host, per param of this partition
        partition.extend(getattr(zero_optimizer, "accumulated_grads_in_cpu", {}).values())
    return {"partition": [t for t in partition if torch.is_tensor(t)],
            "buckets": [t for t in buckets if torch.is_tensor(t)]}


def cpu_shm_segment(rank: int) -> str | None:
    """The /dev/shm name of this rank's CPU all-reduce workspace, or None when DeepSpeed made none.

    DeepSpeed's CPU backend (comm/torch.py TorchBackend, csrc/cpu/comm/shm.cpp shm_initialize,
    0.16-0.19) maps one 66 MiB segment per rank when every rank is local and never unlinks it, so
    each CPU launch leaves 132 MiB of RAM behind in /dev/shm until reboot. The name is built in C
    from the environment at init time: uid, MASTER_ADDR, MASTER_PORT, global rank."""
    import os

    from deepspeed.comm import comm as ds_comm  # the module: the package's `cdb` is a stale None

    if getattr(ds_comm.cdb, "shm_comm_op", None) is None:
        return None
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


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
    """A DeepSpeed config given as a dict, a JSON/HJSON path or base64, read as DeepSpeed reads it
    (0.18+: tensor_parallel.init_utils.load_ds_config; before, the same steps inside DeepSpeedConfig)."""
    try:
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config as _load
    except ImportError:
        return _load_ds_config_017(config)
    return _load(config)


def _load_ds_config_017(config) -> dict:
    import base64
    import os

    import hjson
    from deepspeed.runtime.config_utils import dict_raise_error_on_duplicate_keys
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)) and os.path.exists(config):
        with open(config, "r") as f:
            return hjson.load(f, object_pairs_hook=dict_raise_error_on_duplicate_keys)
    try:
        return hjson.loads(base64.urlsafe_b64decode(config).decode("utf-8"))
    except (UnicodeDecodeError, AttributeError, ValueError, TypeError) as exc:
        raise ValueError("Expected a string path to an existing deepspeed config, or a dictionary or a valid "
                         f"base64. Received: {config}") from exc


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
    buffer without DeepSpeed's defragmentation pass or its memory reports. All are class/module
    attributes swapped for the duration of one synchronous optimizer construction.

    - DeepSpeedZeroOptimizer_Stage3.__init__ calls initialize_ds_offload (603-641), which would
      build a second DeepSpeedZeRoOffload and register a second set of module hooks on top of the
      first.
    - defragment copies the trainable partitions to the host, runs gc.collect() and copies them
      back, to de-fragment a device filled by model init. At a switch only the active set's
      partitions move (2 Psi_a / N bytes) and the full collection alone took ~1 s per switch here
      (it scales with the number of live Python objects, not with the model).
    - see_memory_usage(force=True), which 0.17's constructor calls seven times, runs gc.collect() on
      rank 0 before logging: measured 2.4 s per switch against 0.1 s per step on 2 ranks. The
      report is dropped (a rebuild's logs are silenced anyway, quiet_logs)."""
    from deepspeed.runtime.zero import stage3
    cls = zero3_optimizer_class()
    # 0.19 imports defragment into stage3 from zero/utils; before, it is a staticmethod of the class.
    owner = stage3 if hasattr(stage3, "defragment") else cls
    original_offload = cls.__dict__["initialize_ds_offload"]
    original_defragment = owner.__dict__["defragment"]
    original_report = stage3.see_memory_usage
    cls.initialize_ds_offload = lambda self, *args, **kwargs: parameter_offload
    setattr(owner, "defragment", _defragment_in_place if owner is stage3 else staticmethod(_defragment_in_place))
    stage3.see_memory_usage = lambda *args, **kwargs: None
    try:
        yield
    finally:
        cls.initialize_ds_offload = original_offload
        setattr(owner, "defragment", original_defragment)
        stage3.see_memory_usage = original_report


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
    layer that was ever active fall back to slow synchronous copies. Asked through DeepSpeed's
    accelerator, which also knows memory its native backend pinned (DS_PIN_MEMORY_BACKEND=native,
    invisible to Tensor.is_pinned()), and pinned by it, so its pin accounting sees the copy."""
    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    if not accelerator.is_pinned(t):
        return t.clone()
    return accelerator.pin_memory(t)  # a page-locked copy (make_copy=True)


# The copy a dropped parameter's shard lives in (detach_zero3), referenced from the parameter: the native
# backend frees a pinned allocation when the tensor it returned (a view of the allocation) is collected,
# not with the storage, so `ds_tensor.data = copy` alone would leave the shard in freed memory.
_SHARD_COPY = "_lisa_shard_copy"


def release_shard_copies(params) -> None:
    """After a rebuild: the shards of the parameters the new optimizer trains have moved into its flat
    buffers; the copies they lived in while dropped can go."""
    for p in params:
        copy = getattr(p, _SHARD_COPY, None)
        if copy is not None and p.ds_tensor.untyped_storage().data_ptr() != copy.untyped_storage().data_ptr():
            delattr(p, _SHARD_COPY)


@contextmanager
def rebuild_memory_policy():
    """While a ZeRO optimizer is rebuilt at a switch:

    - DeepSpeed's runtime.utils.empty_cache(), which ZeRO-1/2's constructor calls once per param group
      (stage_1_and_2.py:449), does nothing. It also resets the peak-memory statistics (a rebuild would
      hide its own transient, and every peak before it, from max_memory_allocated()), and on CUDA it
      synchronizes and cudaFrees every cached block, once per group per switch, so the next step
      cudaMallocs all its activations again.
    - The constructor flattens a group on the accelerator when available_memory() holds the flat
      buffer, and on CUDA that is NVML's free memory (cuda_accelerator.py:193-199), to which blocks
      torch's allocator caches count as used: with the cache kept, they are added back (capped at
      total - allocated, DeepSpeed's own figure without NVML), so a nearly full GPU does not take the
      slow path through the host that the cache flush used to avoid.
    """
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime import utils
    from deepspeed.runtime.zero import stage_1_and_2

    accelerator = get_accelerator()
    nvml_or_total = accelerator.available_memory

    def available_memory(device_index=None):
        free = nvml_or_total(device_index)
        allocated = accelerator.memory_allocated(device_index)
        cached = max(0, accelerator.memory_reserved(device_index) - allocated)
        return min(free + cached, max(free, accelerator.total_memory(device_index) - allocated))

    def keep_cache():
        pass

    saved = utils.empty_cache, stage_1_and_2.empty_cache
    shadowed = accelerator.__dict__.get("available_memory")
    utils.empty_cache = stage_1_and_2.empty_cache = keep_cache
    accelerator.available_memory = available_memory
    try:
        yield
    finally:
        utils.empty_cache, stage_1_and_2.empty_cache = saved
        if shadowed is None:
            del accelerator.available_memory
        else:
            accelerator.available_memory = shadowed


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
    # The partitions of the params this optimizer owned are views into its flat bf16 buffer
    # (defragment, 913-1018; under offload_param its pinned host buffer): give each its own storage
    # so the buffer can go, before anything unpins that buffer (DS_PIN_MEMORY_BACKEND=native frees
    # memory when it unpins it).
    with torch.no_grad():
        for p in zero3_trainable_params(zero_optimizer):
            copy = clone_keeping_pinned(p.ds_tensor.data)
            p.ds_tensor.data = copy
            setattr(p, _SHARD_COPY, copy)
            p.grad = None
    # Each of these arrived in a later release than 0.16 and has nothing to undo before it:
    # torch-style backward post hooks (0.18), Muon all-gather buffers and native unpinning (0.19).
    for name in ("unregister_grad_acc_post_hooks", "_clear_muon_allgather_buffers"):
        if hasattr(zero_optimizer, name):
            getattr(zero_optimizer, name)()
    if hasattr(zero_optimizer, "_unpin_offload_buffers"):
        # Without the optimizer state: the moments of the groups the switch keeps are still in use (the
        # rebuild moves them into the new optimizer), and the dropped ones are freed with their last
        # reference, as pinned memory of either backend is.
        state, zero_optimizer.optimizer.state = zero_optimizer.optimizer.state, {}
        try:
            zero_optimizer._unpin_offload_buffers()
        finally:
            zero_optimizer.optimizer.state = state
    if hasattr(zero_optimizer, "ipg_buckets"):  # 0.17+: per-dtype buckets
        zero_optimizer.ipg_buckets.clear()
    else:  # 0.16: one bucket
        zero_optimizer.grads_in_ipg_bucket = []
        zero_optimizer.params_in_ipg_bucket = []
        zero_optimizer._DeepSpeedZeroOptimizer_Stage3__ipg_bucket_flat_buffer = None
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
    for bucket in getattr(zero_optimizer, "ipg_buckets", {}).values():
        if getattr(bucket, "buffer", None) is not None:
            buckets.append(bucket.buffer)
    flat = getattr(zero_optimizer, "_DeepSpeedZeroOptimizer_Stage3__ipg_bucket_flat_buffer", None)  # 0.16
    if flat is not None:
        buckets.append(flat)
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


def zero3_partition_writable(param: torch.nn.Parameter) -> bool:
    """Whether writing `zero3_local_weight`'s tensor is all a ZeRO-3 parameter's value needs: its
    partition lives in `ds_tensor` (not on NVMe, not quantized) across the whole world, with no
    hpZ secondary copy to keep in step (partition_parameters.py:1279-1308, 1778-1900)."""
    import torch.distributed as dist
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    local = param.ds_tensor
    return (getattr(param, "ds_secondary_tensor", None) is None and not hasattr(local, "ds_quant_scale")
            and getattr(local, "final_location", None) != OffloadDeviceEnum.nvme
            and dist.get_world_size(group=param.ds_process_group) == dist.get_world_size())
