"""shard_model: one FSDP2 unit per decoder layer (and per untied embedding or head that never trains), the root
unit for everything always active."""
from __future__ import annotations

from typing import List, Optional

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
                mesh: Optional[DeviceMesh] = None, train_embeddings: bool = True,
                train_head: bool = True) -> nn.Module:
    """Apply `fully_shard` to each decoder layer, then to the root; returns the model (sharded in place).

    Per-layer units are what make LISA cheap on FSDP2: a unit whose parameters all have
    `requires_grad=False` issues no reduce-scatter and holds no gradient, so a frozen layer costs
    only its weight shard. With `mp_bf16` the weights themselves are cast to bf16 before sharding
    (there is no fp32 copy of frozen layers anywhere; LisaOptimizer keeps fp32 masters for the
    active set only) and `reduce_fp32` reduce-scatters gradients in fp32.

    Input embeddings or an LM head that never train (`train_embeddings` / `train_head` False, as in
    LisaConfig) get a unit of their own when untied (`_frozen_embedding_units`).
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
    for module in _frozen_embedding_units(model, train_embeddings, train_head):
        fully_shard(module, mesh=mesh, mp_policy=mp, offload_policy=offload)
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


def _frozen_embedding_units(model: nn.Module, train_embeddings: bool, train_head: bool) -> List[nn.Module]:
    """The input embeddings and LM head that never train, when they share no parameter.

    In the root unit they are gathered whole at the first forward and stay so until the end of
    backward (FSDP2 does not reshard the root after forward), next to the root's flat all-gather
    output, which FSDP2 keeps until the next unit's all-gather: for a 512 MiB Llama checkpoint (vocab
    32000, hidden 768, fp32) that is 2 x 188 MiB on every rank whatever the world size, against its
    256 MiB of shards at 2 ranks. In a unit of its own each is gathered only around its forward (the
    head again for its backward). A frozen unit reduce-scatters nothing, so this adds no gradient
    traffic; trained ones stay in the root, whose single reduce-scatter they share. Tied weights
    stay in the root: one parameter cannot belong to two units."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return []
    inp, out = get_in(), get_out()
    if not isinstance(inp, nn.Module) or not isinstance(out, nn.Module) or inp is out:
        return []
    if {id(p) for p in inp.parameters()} & {id(p) for p in out.parameters()}:
        return []
    return [m for m, trains in ((inp, train_embeddings), (out, train_head)) if not trains]
