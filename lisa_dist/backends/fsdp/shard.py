"""shard_model: one FSDP2 unit per decoder layer, the root unit for everything always active."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from lisa_dist.backends.torch_compat import check_torch
from lisa_dist.devices import rank_device
from lisa_dist.layers import find_decoder_layers


def default_device() -> torch.device:
    """This rank's accelerator (made current; from the launcher's local rank), else the CPU."""
    return rank_device()


def shard_model(model: nn.Module, mp_bf16: bool = True, reduce_fp32: bool = True, cpu_offload: bool = False,
                activation_checkpointing: bool = False, layers_path: Optional[str] = None,
                mesh: Optional[DeviceMesh] = None) -> nn.Module:
    """Apply `fully_shard` to each decoder layer, then to the root; returns the model (sharded in place).

    Per-layer units are what make LISA cheap on FSDP2: a unit whose parameters all have
    `requires_grad=False` issues no reduce-scatter and holds no gradient, so a frozen layer costs
    only its weight shard. With `mp_bf16` the weights themselves are cast to bf16 before sharding
    (there is no fp32 copy of frozen layers anywhere; LisaOptimizer keeps fp32 masters for the
    active set only) and `reduce_fp32` reduce-scatters gradients in fp32.
    """
    check_torch()
    if not torch.distributed.is_initialized():
        raise ValueError("shard_model needs an initialised process group: launch with torchrun and call "
                         "torch.distributed.init_process_group() first (FSDPRunner does both for you)")
    if cpu_offload:
        check_host_backend()
    if mesh is None:
        mesh = init_device_mesh(default_device().type, (torch.distributed.get_world_size(),))
    if activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing "
                             "(transformers' gradient_checkpointing_enable); run without it")
        # Non-reentrant: the reentrant variant does not see FSDP2's unshard hooks on recompute.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mp_bf16:
        model.to(torch.bfloat16)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                  reduce_dtype=torch.float32 if reduce_fp32 else None)
    else:
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32 if reduce_fp32 else None)
    offload: OffloadPolicy = (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload
                              else OffloadPolicy())
    layers = find_decoder_layers(model, layers_path).layers
    for i, layer in enumerate(layers):
        # The last layer's params are needed again right at the start of backward: keep them gathered.
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return model


def check_host_backend() -> None:
    """cpu_offload keeps sharded parameters and gradients on the host, and clipping all-reduces their
    norms there: the process group needs a backend for CPU tensors. DeepSpeed's init_distributed makes
    an NCCL-only group on GPUs, where that all-reduce fails deep inside the first step ("No backend type
    associated with device type cpu"); a one-rank group issues no collective."""
    import torch.distributed as dist
    if dist.get_world_size() == 1:
        return
    config = str(dist.get_backend_config())
    if "cpu:" not in config:
        raise ValueError(f"FSDP2 cpu_offload needs a process group with a CPU backend, this one has {config!r}: "
                         "create it with torch.distributed.init_process_group(\"cpu:gloo,cuda:nccl\") before anything "
                         "else does (FSDPRunner and accelerate's FSDP plugin with offload do), or train without "
                         "cpu_offload")
