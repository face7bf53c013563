"""ZeRO-1/2: rebuild DeepSpeed's optimizer over exactly the LISA trainable set at each switch.

DeepSpeed fixes the parameters its ZeRO-1/2 optimizer owns when it is built (flat bf16 buffers,
fp32 master partitions, gradient hooks), so a switch rebuilds it (docs/design.md#zero-1-and-zero-2).

Layout: one param group for the always-active parameters (key ALWAYS), then one group per active
decoder layer (key: the layer index), in layer order. ZeRO flattens, pads and partitions each group
on its own, so a group's per-rank slice depends only on that group's parameters. That gives two
things for free:
- a group present before and after a switch (the always-active one, or a layer sampled again in
  the next interval) keeps this rank's fp32 master partition and optimizer state as they are,
  moved over without any communication;
- a deactivated layer's slice can be parked on the host (`offload`) and put back verbatim when the
  layer is re-sampled, whatever else is active then.
ZeRO keeps one Adam step counter per group partition, so one group per layer is also what lets a
layer that stays active keep its own bias correction while a newly sampled one starts from step 0,
as in the single-process reference (lisa_dist.optim.LisaOptimizer).
"""
from __future__ import annotations

import gc
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from lisa_dist.backends.deepspeed import _compat

ALWAYS = "always"
GroupKey = Union[str, int]
"""ALWAYS for the always-active group, else the decoder-layer index. When the caller's optimizer
has groups with different hyper-parameters (Trainer: no weight decay for biases and norms), each
part is split by option set j and j > 0 gets the key "<part>.<j>" ("always.1", "3.1")."""


def sub_key(base: GroupKey, option_set: int) -> GroupKey:
    return base if option_set == 0 else f"{base}.{option_set}"


def option_set_of(key: GroupKey) -> int:
    return int(key.rsplit(".", 1)[1]) if isinstance(key, str) and "." in key else 0


def parse_key(key: GroupKey) -> GroupKey:
    """A key read back from JSON or a file name: layer indices may come as digit strings."""
    return int(key) if isinstance(key, str) and key.isdigit() else key

# Torch optimizers keep per-group bookkeeping next to the hyper-parameters; a new group must not
# inherit another group's ("step" is FusedAdam's initial step for fresh state).
_NOT_INHERITED = ("params", "step")


@dataclass
class GroupSlice:
    """This rank's share of one param group: its fp32 master partition and optimizer state."""

    fp32: torch.Tensor
    state: Dict[str, Any]

    @torch.no_grad()
    def to_host(self) -> "GroupSlice":
        # no_grad: the fp32 partition requires grad, and a copy recorded by autograd would keep
        # the old partition alive after the rebuild. Scalars such as torch AdamW's `step` tensor
        # stay where the optimizer expects them.
        state = {k: (v.to("cpu", copy=True) if _is_flat_like(v, self.fp32) else _clone(v))
                 for k, v in self.state.items()}
        return GroupSlice(self.fp32.to("cpu", copy=True), state)

    def nbytes(self) -> int:
        tensors = [self.fp32] + [v for v in self.state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _is_flat_like(value: Any, fp32: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == fp32.shape


def _clone(value: Any) -> Any:
    return value.clone() if torch.is_tensor(value) else value


def group_slices(engine, keys: Sequence[GroupKey]) -> Dict[GroupKey, GroupSlice]:
    """The live slices of the engine's current groups (views, not copies)."""
    optimizer = engine.optimizer
    partitions = _compat.fp32_partitions(optimizer)
    assert len(partitions) == len(keys), "param groups and LISA group keys out of step"
    state = engine.basic_optimizer.state
    return {key: GroupSlice(fp32, dict(state.get(fp32, {}))) for key, fp32 in zip(keys, partitions)}


def inheritable(group: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in group.items() if k not in _NOT_INHERITED}


def group_options(basic: torch.optim.Optimizer, new_groups: Sequence[Tuple[GroupKey, Any]],
                  options: Optional[Sequence[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    if options is None:
        return [inheritable(basic.param_groups[0])] * len(new_groups)
    assert len(options) == len(new_groups), "one option set per new group"
    return [dict(o) for o in options]


def rebuild(engine, old_keys: Sequence[GroupKey], new_groups: Sequence[Tuple[GroupKey, List[nn.Parameter]]],
            managed: Sequence[nn.Parameter], host: Optional[Dict[GroupKey, GroupSlice]],
            options: Optional[Sequence[Dict[str, Any]]] = None) -> None:
    """Replace the engine's ZeRO-1/2 optimizer by one over `new_groups`.

    Groups whose key is in both `old_keys` and `new_groups` keep this rank's fp32 partition and
    optimizer state. With `host` (state_policy="offload") dropped groups are copied into it and
    groups found in it are restored from it; without, dropped groups are discarded and new ones
    start from the current weights and fresh state. `managed` are all parameters LISA decides
    `requires_grad` for; afterwards exactly those in `new_groups` require grad. `options` are the
    hyper-parameters of each new group (default: those of the current first group, for all).
    """
    old = engine.optimizer
    basic = engine.basic_optimizer
    assert isinstance(old, _compat.zero12_optimizer_class()), f"expected a ZeRO-1/2 optimizer, got {type(old)}"
    new_keys = [key for key, _ in new_groups]
    assert len(set(new_keys)) == len(new_keys), f"duplicate group keys {new_keys}"

    slices = group_slices(engine, old_keys)
    kept = {key: s for key, s in slices.items() if key in new_keys}
    if host is not None:
        for key, s in slices.items():
            if key not in kept:
                host[key] = s.to_host()
    options = group_options(basic, new_groups, options)
    del slices

    loss_scale = _compat.loss_scale_state(old)  # fp16: the dynamic scale and its window go on
    old_flats = [weakref.ref(t) for t in _compat.flat_bit16_buffers(old)]
    # The old flat buffers die only when no param views them any more.
    with torch.no_grad():
        for group in _compat.bit16_groups(old):
            for p in group:
                p.data = p.data.clone()
    for p in managed:
        p.grad = None
    _compat.destroy_zero12(old)
    _compat.drop_engine_optimizer(engine)
    basic.state = defaultdict(dict)
    basic.param_groups = []
    del old
    if any(ref() is not None for ref in old_flats):
        # Only a reference cycle can keep them; a full collection costs ~1 s with transformers
        # loaded, so it runs only when reference counting was not enough.
        gc.collect()
    if any(ref() is not None for ref in old_flats):
        # Seen once in a CPU benchmark run and not reproduced since: likely a C++ reference (a
        # communication work object) released a moment later. User code holding engine.optimizer
        # does it for good, hence the hint.
        warnings.warn("the previous ZeRO optimizer's flat buffers are still referenced after the LISA switch; "
                      "they stay allocated until that reference goes (keep the optimizer returned by "
                      "lisa_dist.backends.deepspeed.initialize rather than engine.optimizer)",
                      RuntimeWarning, stacklevel=2)

    trainable = {id(p) for _, params in new_groups for p in params}
    for p in managed:
        p.requires_grad_(id(p) in trainable)
    basic.param_groups = [{**o, "params": list(params)} for o, (_, params) in zip(options, new_groups)]
    _compat.configure_optimizer(engine, basic)
    _compat.set_loss_scale_state(engine.optimizer, loss_scale)

    partitions = _compat.fp32_partitions(engine.optimizer)
    with torch.no_grad():
        for key, fp32 in zip(new_keys, partitions):
            saved = kept.pop(key, None)
            if saved is None and host is not None:
                saved = host.pop(key, None)
            if saved is None:
                continue
            assert saved.fp32.shape == fp32.shape, (
                f"group {key!r}: partition {tuple(fp32.shape)} differs from the saved {tuple(saved.fp32.shape)}")
            fp32.copy_(saved.fp32)
            if saved.state:
                basic.state[fp32] = {k: (v.to(fp32.device) if _is_flat_like(v, fp32) else v)
                                     for k, v in saved.state.items()}
    del kept
