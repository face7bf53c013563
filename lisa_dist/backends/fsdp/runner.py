"""FSDPRunner: the FSDP2 runner behind `lisa-train --backend fsdp2` (launched with torchrun)."""
from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn

from lisa_dist import loading, vocab_rows
from lisa_dist.backends.fsdp import dcp_checkpoint
from lisa_dist.backends.fsdp.optimizer import FSDPLisaOptimizer
from lisa_dist.backends.fsdp.shard import default_device, reshard_after_evaluation, shard_model
from lisa_dist.backends.single import SingleRunner
from lisa_dist.config import LisaConfig
from lisa_dist.devices import rank_device
from lisa_dist.outlier import resolve_calibration


def init_distributed() -> bool:
    """Initialise the default process group from torchrun's environment unless already done.
    Returns True when this call created it (and so the runner should destroy it)."""
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--backend fsdp2 runs under a distributed launcher: use `torchrun --nproc_per_node N "
                         "-m lisa_dist.recipe.train --backend fsdp2 ...` (or `accelerate launch --config_file "
                         "launch/accelerate_fsdp2.yaml ...`); RANK/WORLD_SIZE are not set")
    dist.init_process_group(process_group_backend(rank_device()))
    return True


def process_group_backend(device: torch.device) -> str:
    """gloo on CPUs; on GPUs NCCL for CUDA tensors plus gloo for CPU ones: with --cpu-offload the
    sharded parameters and gradients live on the host, and clipping all-reduces their norms there
    (an NCCL-only group fails with "No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


class FSDPRunner(SingleRunner):
    """One optimizer step per `train_step`; gradients accumulate over the given micro-batches.

    Weights keep the dtype the model arrives in: bf16 weights are sharded as bf16 (frozen layers
    cost 2 bytes per parameter / world size) with fp32 gradient reduction and fp32 masters for the
    active set; fp32 weights train in fp32 throughout.

    A model whose parameters are on the meta device (modeling.build_empty_model_and_tokenizer) is
    sharded first and then filled by `load_weights(sharded_model)` (modeling.weights_loader), so a
    rank only ever holds its own shards.
    """

    stage = "fsdp2"

    def __init__(self, model: nn.Module, lisa: LisaConfig, *, lr: float, weight_decay: float = 0.0,
                 cpu_offload: bool = False, activation_checkpointing: bool = False,
                 warmup_steps: int = 0, max_grad_norm: float = 1.0,
                 optimizer_cls: Type[torch.optim.Optimizer] = torch.optim.AdamW,
                 load_weights: Optional[Callable[[nn.Module], None]] = None, calibration: Optional[Any] = None,
                 **optimizer_kwargs):
        empty = loading.has_meta_parameters(model)
        if empty and load_weights is None:
            raise ValueError("the model's parameters are on the meta device: pass load_weights= "
                             "(lisa_dist.recipe.modeling.weights_loader) to fill them after sharding")
        self._owns_process_group = init_distributed()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = default_device()
        self.weight_dtype = next(model.parameters()).dtype
        if self.weight_dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"FSDPRunner trains bf16 or fp32 weights, the model is {self.weight_dtype}; "
                             "load it with dtype=torch.bfloat16 (or --dtype bf16)")
        # embedding_update="rows": the row deltas must exist before sharding, to be sharded with the root unit
        vocab_rows.attach(model, lisa)
        self.model = shard_model(model, mp_bf16=self.weight_dtype == torch.bfloat16, reduce_fp32=True,
                                 cpu_offload=cpu_offload, activation_checkpointing=activation_checkpointing,
                                 layers_path=lisa.layers_path, train_embeddings=lisa.train_embeddings,
                                 train_head=lisa.train_head)
        if empty:
            loading.materialize(self.model, torch.device("cpu") if cpu_offload else self.device)
            load_weights(self.model)
        calibration = resolve_calibration(calibration, self.rank, self.world_size)
        self._attach_optimizer(FSDPLisaOptimizer(self.model, lisa, optimizer_cls, calibration=calibration,
                                                 lr=lr, weight_decay=weight_decay, **optimizer_kwargs),
                               warmup_steps, max_grad_norm)

    # --- training ------------------------------------------------------------------------------

    def train_step(self, micro_batches: List[Dict[str, torch.Tensor]]) -> float:
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        self.model.train()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for batch in micro_batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            # FSDP2 reduce-scatters after every backward and averages over ranks; scaling by the
            # micro-batch count makes the accumulated gradient the mean over the global batch.
            loss = self.model(**batch).loss / len(micro_batches)
            loss.backward()
            total += loss.detach().float()
        self._clip_and_step()
        dist.all_reduce(total)
        return total.item() / self.world_size

    def evaluate(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> Tuple[float, int]:
        try:
            return super().evaluate(batches)
        finally:
            reshard_after_evaluation(self.model)

    # --- checkpoints and export --------------------------------------------------------------

    def save_checkpoint(self, directory, step: int) -> None:
        """Sharded checkpoint (torch.distributed.checkpoint) of weights, masters, moments, the LR
        schedule and the LISA schedule position; every rank writes its own shards."""
        dcp_checkpoint.save(self.model, self.optimizer, self.scheduler, Path(directory), step)

    def load_checkpoint(self, directory) -> int:
        """Restore a `save_checkpoint` directory written with the same model and LisaConfig; returns
        the step it was saved at. Tested at the same world size (DCP can reshard DTensors to another
        one, which is not tested here)."""
        return dcp_checkpoint.load(self.model, self.optimizer, self.scheduler, Path(directory))

    def save_pretrained(self, out_dir, tokenizer=None) -> None:
        """Gather the full weights to rank 0's host memory and write a Hugging Face safetensors model."""
        dcp_checkpoint.export_pretrained(self.model, Path(out_dir), tokenizer)

    def close(self) -> None:
        """Free the sharded model and optimizer before the process group goes away; with gloo, a
        process still holding an FSDP2 model at interpreter exit can abort (docs/design.md#pitfalls)."""
        self.optimizer.zero_grad()
        del self.optimizer, self.scheduler, self.model
        gc.collect()
        if self._owns_process_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
