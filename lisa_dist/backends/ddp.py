"""LISA under plain data parallelism (DDP, no ZeRO): only the active layers' gradients cross ranks.

DistributedDataParallel fixes its buckets at construction over the parameters that require grad
then: a layer frozen later never delivers its gradient ("Expected to have finished reduction"),
one unfrozen later is never reduced. So DDP is told to ignore the decoder layers and handles only
the always-active parameters (which get a gradient every step), and `ActiveLayerGradReducer`
averages each active layer's gradients itself, one flat all-reduce per layer as soon as the
backward has produced all of them, so gradient clipping and the optimizer see reduced gradients.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
from torch import nn

from lisa_dist.layers import ParamSplit


def layer_parameter_names(model: nn.Module, split: ParamSplit) -> List[str]:
    """Fully qualified names of every decoder-layer parameter (what DDP must ignore)."""
    ids = {id(p) for layer in split.per_layer for _, p in layer}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@torch.no_grad()
def broadcast_layers(split: ParamSplit, src: int = 0) -> None:
    """Start every rank from rank `src`'s decoder layers (DDP broadcasts only what it manages)."""
    for layer in split.per_layer:
        for _, p in layer:
            dist.broadcast(p.data, src)


class ActiveLayerGradReducer:
    """Averages active decoder layers' gradients over the default process group during backward.

    `should_sync()` is asked once per layer per backward; a gradient-accumulation micro-step that
    does not synchronise (DDP's no_sync) answers False and the local sum keeps accumulating.
    """

    def __init__(self, split: ParamSplit, should_sync: Callable[[], bool]):
        self.split = split
        self.should_sync = should_sync
        self.world_size = dist.get_world_size()
        self.reduced_numel = 0
        """Elements all-reduced so far (the tests compare it with the active set's size)."""
        self._ready: Dict[int, int] = {}
        self._handles = []
        for i, layer in enumerate(split.per_layer):
            for _, p in layer:
                # torch registers the hook only on a tensor that requires grad; it stays across toggles.
                trainable = p.requires_grad
                p.requires_grad_(True)
                self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, i)))
                p.requires_grad_(trainable)

    def _on_grad(self, layer: int, _param: torch.Tensor) -> None:
        params = [p for _, p in self.split.per_layer[layer] if p.requires_grad]
        count = self._ready.get(layer, 0) + 1
        if count < len(params):
            self._ready[layer] = count
            return
        self._ready.pop(layer, None)
        if not self.should_sync():
            return
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        for g, reduced in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(reduced.view_as(g))
        self.reduced_numel += flat.numel()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
