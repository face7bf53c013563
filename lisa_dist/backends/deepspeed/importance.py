"""Importance statistics under ZeRO: gradient norms from the gradient partitions, OwLore ratios
from the weight shards (ZeRO-3) or full weights (ZeRO-1/2).

Both end in all-reduces, so every rank holds the same numbers and draws the same layers.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Union

import torch
import torch.distributed as dist

from lisa_dist.backends.deepspeed import _compat
from lisa_dist.outlier import local_scores, outlier_ratios, resolve_calibration

Calibration = Union[Iterable[Any], Callable[[int, int], Iterable[Any]]]


def layer_grad_squares(engine, lisa) -> List[float]:
    """Squared norm of each active layer's reduced gradient, summed over the ranks' partitions.
    Called at the start of the ZeRO optimizer's step: gradients are reduced, not yet clipped."""
    sq = torch.zeros(len(lisa.active_layers), dtype=torch.float64, device=lisa.device)
    if int(engine.zero_optimization_stage()) == 3:
        from deepspeed.utils import safe_get_local_grad
        for j, i in enumerate(lisa.active_layers):
            for p in lisa.split.layer_params([i]):
                g = safe_get_local_grad(p)
                if g is not None:
                    sq[j] += g.double().pow(2).sum().to(sq.device)
    else:
        for j, i in enumerate(lisa.active_layers):
            for g in _compat.zero12_grad_partitions(engine.optimizer, lisa.group_keys.index(i)):
                sq[j] += g.double().pow(2).sum().to(sq.device)
    dist.all_reduce(sq)
    return sq.cpu().tolist()


def _zero3_scores(weight: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    local, start, real = _compat.zero3_local_weight(weight)
    cols = (torch.arange(start, start + real, device=local.device) % weight.ds_shape[-1])
    return local[:real].detach().abs().float() * col_norm.to(local.device, torch.float32)[cols]


def _all_reduce(t: torch.Tensor) -> None:
    dist.all_reduce(t)


def engine_outlier_ratios(engine, lisa, calibration: Calibration) -> List[float]:
    """OwLore ratios of the engine's decoder layers: forward passes through the engine (ZeRO-3
    gathers each layer as usual), column norms summed over ranks, then scores from each rank's
    partition (ZeRO-3) or the full weights (ZeRO-1/2)."""
    from lisa_dist.layers import find_decoder_layers

    calibration = resolve_calibration(calibration, dist.get_rank(), dist.get_world_size())
    layers = list(find_decoder_layers(engine.module, lisa.split.layers_path).layers)
    zero3 = int(engine.zero_optimization_stage()) == 3
    was_training = engine.module.training
    engine.module.eval()

    def forward(batch):
        return engine(**{k: v.to(engine.device) for k, v in batch.items() if k != "labels"})

    try:
        return outlier_ratios(layers, forward, calibration, lisa.config.outlier_threshold,
                              scores=_zero3_scores if zero3 else local_scores, all_reduce=_all_reduce,
                              sharded=zero3)
    finally:
        engine.module.train(was_training)
