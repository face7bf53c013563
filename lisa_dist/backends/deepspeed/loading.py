"""Build or load a model already partitioned for ZeRO-3, so no rank ever holds all of it.

A 70B model is 140 GB in bf16: materialising it on one rank before deepspeed.initialize
partitions it would need that much memory per process. transformers' DeepSpeed integration builds
the model under `deepspeed.zero.Init` instead (each module's parameters are partitioned as soon as
the module is constructed) when a `HfDeepSpeedConfig` object is alive:
- from_config (presets): random init runs per module on gathered parameters, on rank 0, and is
  broadcast (transformers.integrations.deepspeed.initialize_weights_zero3). That init consumes the
  RNG in another order than the single-process build, so `load_partitioned` overwrites it with the
  whole, seeded preset built on rank 0 first (`initial_state`): every backend starts from the same
  weights for the same seed;
- from_pretrained: rank 0 reads the checkpoint and copies each module's tensors into the gathered
  parameters, which are re-partitioned module by module. Measured with transformers 5.24 at 2 ranks
  (benchmarks/load_memory.py), that still peaked above the checkpoint's size on every rank, so for
  safetensors checkpoints `load_partitioned` builds from the config instead, without transformers'
  random init (the files overwrite every parameter), and fills the partitions itself
  (`checkpoint_files`): each rank reads, one file at a time, only the rows of each tensor that
  cover its partition, a contiguous range of the flattened tensor.
While it builds and fills, glibc maps every large host block on its own
(`memory.large_host_blocks_mapped`): zero.Init allocates each parameter whole before partitioning
it, and glibc's heap kept some of those pages after they were freed, a different amount on each
rank (benchmarks/results/zero3_load_stages.md).
transformers holds the HfDeepSpeedConfig only through a weak reference, so it is kept on the model
for as long as the model lives (resizing embeddings, generation and saving consult it too).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn


def load_partitioned(ds_config: dict, build: Callable[[], Tuple[nn.Module, Any]],
                     initial_state: Optional[Callable[[], Mapping[str, torch.Tensor]]] = None,
                     checkpoint_files: Optional[Sequence[Path]] = None) -> Optional[Tuple[nn.Module, Any]]:
    """`build()`'s (model, tokenizer), built or loaded under ZeRO-3 partitioning, or None when
    `ds_config` is not a ZeRO-3 config (the caller then builds the model whole). `ds_config` must be
    the resolved config the engine will be built from: zero.Init has to agree with it on precision
    and parameter offload. `build` constructs the model with from_config or from_pretrained, which
    transformers routes through zero.Init while the HfDeepSpeedConfig made here is alive.
    With `initial_state`, rank 0 calls it before anything is partitioned (it must build whole) and
    its tensors replace the built parameters, one gathered parameter at a time; with
    `checkpoint_files` (safetensors; `build` then builds from the config) those files do.
    Initialises the process group (zero.Init partitions across it)."""
    if int((ds_config.get("zero_optimization") or {}).get("stage", 0)) != 3:
        return None
    import transformers
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from lisa_dist.backends.deepspeed import _compat, process_group
    from lisa_dist.memory import large_host_blocks_mapped

    _compat.check_deepspeed()
    _compat.install_zero3_gather_fix()
    process_group.ensure_initialized()
    import torch.distributed as dist
    initial = initial_state() if initial_state is not None and dist.get_rank() == 0 else None
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    assert hf_ds_config.is_zero3()

    # Every whole tensor that construction and loading free goes straight back to the OS.
    with large_host_blocks_mapped():
        model, tokenizer = build()
        whole = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
        if whole:
            raise RuntimeError(
                f"transformers {transformers.__version__} built {type(model).__name__} without ZeRO-3 partitioning "
                f"({len(whole)} parameters whole, e.g. {whole[0]}); its DeepSpeed integration "
                "(transformers.integrations.deepspeed.HfDeepSpeedConfig) did not take effect")
        if initial_state is not None:
            _overwrite(model, initial)
        if checkpoint_files is not None:
            _fill_from_files(model, checkpoint_files)
    model._lisa_hf_ds_config = hf_ds_config  # transformers keeps only a weak reference
    return model, tokenizer


@torch.no_grad()
def _overwrite(model: nn.Module, state: Optional[Mapping[str, torch.Tensor]]) -> None:
    """Rank 0's `state` (None elsewhere) into the partitioned parameters: gathered one at a time,
    written on rank 0, re-partitioned on every rank as the context exits."""
    import deepspeed

    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if state is not None:
                param.data.copy_(state[name])


@torch.no_grad()
def _fill_from_files(model: nn.Module, files: Sequence[Path]) -> None:
    """Every parameter's partition from the safetensors files, one file mapped at a time: each rank
    reads only the rows covering its flat range of each tensor (`get_slice`) and writes them into
    its partition, so no rank reads a whole tensor, nothing is gathered and no collective runs per
    parameter. Tied parameters are written once. Partitions DeepSpeed keeps elsewhere (NVMe,
    quantized, hpZ) are gathered, written on rank 0 and re-partitioned instead."""
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    from lisa_dist.backends.deepspeed import _compat

    params = dict(model.named_parameters(remove_duplicate=False))
    filled = set()
    reader = dist.get_rank() == 0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                param = params.get(key)
                if param is None or id(param) in filled:
                    continue
                stored = f.get_slice(key)
                if tuple(stored.get_shape()) != tuple(param.ds_shape):
                    raise ValueError(f"{path.name}: {key} has shape {tuple(stored.get_shape())} but "
                                     f"{type(model).__name__} expects {tuple(param.ds_shape)}; is it a checkpoint "
                                     "of this architecture (same config.json)?")
                if _compat.zero3_partition_writable(param):
                    _write_partition(param, stored)
                else:  # collective: every rank takes this branch for the same parameter
                    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                        if reader:
                            param.data.copy_(f.get_tensor(key))
                filled.add(id(param))
    missing = [n for n, p in params.items() if id(p) not in filled]
    if missing:
        raise ValueError(f"the checkpoint has no tensor for {len(missing)} parameters of {type(model).__name__} "
                         f"(e.g. {missing[:3]}); is it a checkpoint of this architecture?")


def _write_partition(param: nn.Parameter, stored) -> None:
    """This rank's elements of the flattened tensor `stored` (a safetensors slice) into its
    partition; the padding past the tensor's end is zeroed."""
    from lisa_dist.backends.deepspeed import _compat

    local, start, count = _compat.zero3_local_weight(param)
    if count:
        local.narrow(0, 0, count).copy_(read_flat_range(stored, tuple(param.ds_shape), start, count))
    local.narrow(0, count, local.numel() - count).zero_()


def read_flat_range(stored, shape: Tuple[int, ...], start: int, count: int) -> torch.Tensor:
    """Elements [start, start + count) of the flattened tensor `stored` (a safetensors slice of
    `shape`), reading only the rows that hold them."""
    if not shape:  # a scalar has no rows to slice
        return stored[...].reshape(-1).narrow(0, start, count)
    row = math.prod(shape[1:])
    first, stop = start // row, -(-(start + count) // row)
    return stored[first:stop].reshape(-1).narrow(0, start - first * row, count)
