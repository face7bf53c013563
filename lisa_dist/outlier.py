"""OwLore outlier ratios: how much of each decoder layer is "outlier" weight, measured once before training.

For every nn.Linear in decoder layer l, with W its weight (out x in) and X its inputs over the
calibration batches (all tokens, all ranks), the score of weight (i, j) is

    A_ij = |W_ij| * ||X_j||_2,

||X_j||_2 the L2 norm of input column j over every calibration token. The layer's outlier ratio is

    D_l = #{(i, j) in the layer's linears : A_ij > M * mean(A)} / #(weights of the layer's linears),

the mean taken over all linears of the layer together, M = LisaConfig.outlier_threshold (13 in
OwLore's code, its Hyper_m). sampling="outlier" draws layers with probability proportional to D_l.
Biases, norms and padding positions are not treated specially (padding tokens count as tokens).

Backends differ only in where the weights live: full weights (one process, ZeRO-1/2) score every
element on every rank; sharded ones (FSDP2 DTensor rows, ZeRO-3 flat partitions) score this rank's
elements and sum the per-layer totals and counts across ranks. Column norms are summed across ranks
in every distributed case, so every rank ends with the same D on the same calibration data.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch
from torch import nn

LocalScores = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(weight parameter, column norms ||X_j||) -> this rank's scores A_ij, flat."""


def local_scores(weight: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """Scores of the elements this rank holds: all of a plain tensor, the row shard of an FSDP2 DTensor."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(weight, DTensor):
        assert all(p == Shard(0) for p in weight.placements), f"expected row-sharded weights, got {weight.placements}"
        weight = weight.to_local()
    return (weight.detach().abs().float() * col_norm.to(weight.device, torch.float32)[None, :]).flatten()


def resolve_calibration(calibration, rank: int, world_size: int):
    """Calibration batches given directly, or by a callable (rank, world_size) -> batches for callers
    that only know their rank once the process group exists."""
    return calibration(rank, world_size) if callable(calibration) else calibration


def linears(layer: nn.Module) -> List[nn.Linear]:
    return [m for m in layer.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def outlier_ratios(layers: Sequence[nn.Module], forward: Callable[[Any], Any], batches: Iterable[Any],
                   threshold: float, *, scores: LocalScores = local_scores,
                   all_reduce: Optional[Callable[[torch.Tensor], None]] = None, sharded: bool = False) -> List[float]:
    """D_l for each decoder layer in `layers` (the module docstring has the formula).

    `forward(batch)` runs the model on one calibration batch (every rank the same number of
    batches: sharded forwards are collective). `all_reduce` sums a float64 tensor across ranks in
    place (None in one process); `sharded` says each rank's `scores` cover only its share of the
    weights, so layer totals and counts are summed too.
    """
    per_layer = [linears(layer) for layer in layers]
    missing = [i for i, lins in enumerate(per_layer) if not lins]
    if missing:
        raise ValueError(f"decoder layers {missing} contain no nn.Linear, so they have no OwLore outlier ratio; "
                         "use sampling=\"uniform\", \"weighted\" or \"gradient\" for this model")
    sq_norms = {}
    hooks = []

    def hook(module, inputs, _output):
        x = inputs[0].detach()
        acc = x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        sq_norms[module] = sq_norms[module] + acc if module in sq_norms else acc

    for lins in per_layer:
        hooks.extend(m.register_forward_hook(hook) for m in lins)
    try:
        count = 0
        for batch in batches:
            forward(batch)
            count += 1
    finally:
        for h in hooks:
            h.remove()
    if not count:
        raise ValueError("sampling=\"outlier\" needs at least one calibration batch")
    ordered = [m for lins in per_layer for m in lins]
    unused = [i for i, lins in enumerate(per_layer) if any(m not in sq_norms for m in lins)]
    if unused:
        raise ValueError(f"decoder layers {unused} have nn.Linear modules that the calibration forward never "
                         "called, so their outlier ratio is undefined; forward the model itself (not a submodule) "
                         "or use another sampling mode")
    flat = torch.cat([sq_norms[m] for m in ordered])
    if all_reduce is not None:
        all_reduce(flat)
    norms = dict(zip(ordered, torch.split(flat.sqrt(), [sq_norms[m].numel() for m in ordered])))

    totals = torch.zeros(2 * len(per_layer), dtype=torch.float64)  # [score sums..., element counts...]
    for i, lins in enumerate(per_layer):
        for m in lins:
            a = scores(m.weight, norms[m])
            totals[i] += a.double().sum().cpu()
            totals[len(per_layer) + i] += a.numel()
    if sharded and all_reduce is not None:
        totals = totals.to(flat.device)
        all_reduce(totals)
        totals = totals.cpu()
    sums, numels = totals[:len(per_layer)], totals[len(per_layer):]
    outliers = torch.zeros(len(per_layer), dtype=torch.float64)
    for i, lins in enumerate(per_layer):
        bar = threshold * (sums[i] / numels[i]).item()
        for m in lins:
            outliers[i] += (scores(m.weight, norms[m]).double() > bar).sum().cpu()
    if sharded and all_reduce is not None:
        outliers = outliers.to(flat.device)
        all_reduce(outliers)
        outliers = outliers.cpu()
    return [float(c / n) for c, n in zip(outliers.tolist(), numels.tolist())]
