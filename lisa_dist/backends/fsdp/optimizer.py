"""LisaOptimizer on FSDP2-sharded (DTensor) parameters.

The reference optimizer already works on DTensors as they are: a master is
`p.detach().to(float32, copy=True)`, so it is an fp32 DTensor with the parameter's sharding and
holds only this rank's shard, and the inner AdamW steps DTensors. What FSDP2 adds:

- after every change of the trainable set, FSDP2's per-unit reduce dtype must be recomputed
  (see _compat.refresh_mp_dtypes), or layers activated after the first forward reduce in bf16;
- ranks must agree on the active set (lisa_dist.agreement, one small collective per switch);
- byte counts are this rank's shard (lisa_dist.memory.local_tensor_bytes handles DTensors).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn

from lisa_dist import vocab_rows
from lisa_dist.agreement import check_agreement
from lisa_dist.backends.fsdp.shard import default_device
from lisa_dist.backends.torch_compat import check_torch, refresh_mp_dtypes
from lisa_dist.config import LisaConfig
from lisa_dist.optim import LisaOptimizer, _forward
from lisa_dist.outlier import outlier_ratios


class FSDPLisaOptimizer(LisaOptimizer):
    """LisaOptimizer for a model sharded by `shard_model`; build it after sharding."""

    def __init__(self, model: nn.Module, config: LisaConfig,
                 optimizer_cls: Type[torch.optim.Optimizer] = torch.optim.AdamW, *,
                 calibration: Optional[Iterable[Dict[str, Any]]] = None, **optimizer_kwargs):
        check_torch()
        if config.embedding_update == "rows" and vocab_rows.find(model) is None:
            raise ValueError("embedding_update=\"rows\" on FSDP2: call lisa_dist.vocab_rows.attach(model, config) "
                             "before fully_shard / shard_model (FSDPRunner does), so the row deltas are sharded "
                             "with the model's root unit")
        # Set before super().__init__(), which performs the first switch through _switch_to.
        self._model = model
        super().__init__(model, config, optimizer_cls, calibration=calibration, **optimizer_kwargs)

    def _switch_to(self, new_active: Tuple[int, ...]) -> None:
        super()._switch_to(new_active)
        refresh_mp_dtypes(self._model)
        check_agreement(self.switch_index, self.active_layers, default_device(), self.importance.probabilities)

    # --- importance statistics from shards -------------------------------------------------------

    def _outlier_ratios(self, model: nn.Module, calibration: Iterable[Dict[str, Any]]) -> List[float]:
        # Row shards of every weight on every rank, so layer totals and counts are summed too.
        return outlier_ratios(self.split_layers(model), lambda b: _forward(model, b, default_device()), calibration,
                              self.config.outlier_threshold, all_reduce=_all_reduce, sharded=True)

    def _sum_across_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """Each rank holds a disjoint row shard of every gradient: the squares sum to the full norm."""
        _all_reduce(t)
        return t

    # --- checkpoint support ------------------------------------------------------------------

    def prepare_for_load(self, active_layers: Tuple[int, ...]) -> None:
        """Switch to a checkpoint's active set and materialise optimizer state for it, so that
        `state_dict()` has the checkpoint's structure and can be a template for an in-place load."""
        self._switch_to(tuple(active_layers))
        self._materialise_state()

    @torch.no_grad()
    def _materialise_state(self) -> None:
        # A step at lr=0 on zero gradients creates the moments without moving any master
        # (the same trick torch.distributed.checkpoint.state_dict uses for empty optimizers).
        masters = [m for group in self._inner.param_groups for m in group["params"]
                   if m not in self._inner.state or not self._inner.state[m]]
        if not masters:
            return
        saved_lr = [group["lr"] for group in self._inner.param_groups]
        for group in self._inner.param_groups:
            group["lr"] = 0.0
        for m in masters:
            m.grad = torch.zeros_like(m)
        self._inner.step()
        for m in masters:
            m.grad = None
        for group, lr in zip(self._inner.param_groups, saved_lr):
            group["lr"] = lr


def _all_reduce(t: torch.Tensor) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
