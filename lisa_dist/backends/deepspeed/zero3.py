"""ZeRO-3: rebuild DeepSpeed's stage-3 optimizer over exactly the LISA trainable set at each switch.

Under ZeRO-3 every parameter is partitioned (`ds_tensor`) whatever its `requires_grad`, and the
optimizer takes only the trainable ones: frozen layers cost their bf16 shard and nothing else. The
stage-3 optimizer fixes its trainable set when it is built (flat bf16 partition buffer, gradient
partition buffer, fp32 master partitions, gradient hooks), so a switch rebuilds it
(docs/design.md#zero-3), and what must survive the rebuild is the parameter partitioning: the
DeepSpeedZeRoOffload object, its module hooks and its gather coordinator. The old optimizer is
unhooked by hand instead of destroy()ed (which removes those module hooks), and the new one is
handed the existing offload object.

The group layout is zero12's: [always-active, one group per active layer]. DeepSpeed cuts each
param group into sub-groups on its own (sub_group_size), so a group's fp32 partitions and
optimizer state depend only on that group's parameters and move across a rebuild by key, exactly
and without communication, whatever else is active; `offload` parks them on the host.
"""
from __future__ import annotations

import gc
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lisa_dist.backends.deepspeed import _compat
from lisa_dist.backends.deepspeed.zero12 import GroupKey, GroupSlice, _is_flat_like, group_options


@dataclass
class GroupShards:
    """This rank's share of one param group under ZeRO-3: one fp32 partition and its optimizer
    state per DeepSpeed sub-group, in sub-group order."""

    parts: List[GroupSlice] = field(default_factory=list)

    def to_host(self) -> "GroupShards":
        # DeepSpeed marks fp32 partitions requires_grad; a copy made with autograd on would keep
        # the old partition alive through its grad_fn.
        with torch.no_grad():
            return GroupShards([p.to_host() for p in self.parts])

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)

    def tensors(self) -> List[torch.Tensor]:
        return [t for p in self.parts for t in [p.fp32, *p.state.values()] if torch.is_tensor(t)]


def group_shards(engine, keys: Sequence[GroupKey]) -> Dict[GroupKey, GroupShards]:
    """The live shards of the engine's current groups (views, not copies)."""
    optimizer = engine.optimizer
    partitions = _compat.zero3_fp32_partitions(optimizer)
    sources = _compat.zero3_sub_group_sources(optimizer)
    assert max(sources, default=-1) < len(keys), "param groups and LISA group keys out of step"
    state = engine.basic_optimizer.state
    out: Dict[GroupKey, GroupShards] = {key: GroupShards() for key in keys}
    for fp32, group in zip(partitions, sources):
        out[keys[group]].parts.append(GroupSlice(fp32, dict(state.get(fp32, {}))))
    return out


def rebuild(engine, old_keys: Sequence[GroupKey], new_groups: Sequence[Tuple[GroupKey, List[nn.Parameter]]],
            managed: Sequence[nn.Parameter], host: Optional[Dict[GroupKey, GroupShards]],
            options: Optional[Sequence[Dict]] = None) -> None:
    """Replace the engine's stage-3 optimizer by one over `new_groups`; same contract as
    zero12.rebuild. Collective: every rank must call it at the same point."""
    old = engine.optimizer
    basic = engine.basic_optimizer
    assert isinstance(old, _compat.zero3_optimizer_class()), f"expected a ZeRO-3 optimizer, got {type(old)}"
    new_keys = [key for key, _ in new_groups]
    assert len(set(new_keys)) == len(new_keys), f"duplicate group keys {new_keys}"

    shards = group_shards(engine, old_keys)
    kept = {key: s for key, s in shards.items() if key in new_keys}
    if host is not None:
        host.update({key: s.to_host() for key, s in shards.items() if key not in kept})
    options = group_options(basic, new_groups, options)
    del shards

    loss_scale = _compat.loss_scale_state(old)  # fp16: the dynamic scale and its window go on
    offload = _compat.zero3_parameter_offload(old)
    old_buffers = [weakref.ref(t) for t in _compat.zero3_flat_buffers(old)]
    _compat.detach_zero3(old)
    for p in managed:
        p.grad = None
    _compat.drop_engine_optimizer(engine)
    basic.state = defaultdict(dict)
    basic.param_groups = []
    del old

    trainable = {id(p) for _, params in new_groups for p in params}
    for p in managed:
        p.requires_grad_(id(p) in trainable)
    basic.param_groups = [{**o, "params": list(params)} for o, (_, params) in zip(options, new_groups)]
    with _compat.zero3_rebuild_context(offload):
        _compat.configure_optimizer(engine, basic)
    _compat.release_shard_copies(p for _, params in new_groups for p in params)
    _compat.set_loss_scale_state(engine.optimizer, loss_scale)
    # Building the optimizer gathers and re-partitions every trainable param to hook it, behind
    # the coordinator's back; the recorded forward trace no longer describes what is in flight.
    _compat.invalidate_gather_trace(engine.optimizer)

    _restore(engine, new_keys, kept, host)
    del kept
    # detach_zero3 dropped the old optimizer's references to its buffers and the saved shards are
    # consumed: only a reference from outside (a view someone kept) can still hold one. The full
    # collection is the slow path (~1 s with transformers loaded) and must stay exceptional.
    if any(ref() is not None for ref in old_buffers):
        gc.collect()
    if any(ref() is not None for ref in old_buffers):
        warnings.warn("the previous ZeRO-3 optimizer is still referenced outside the engine (keep the optimizer "
                      "returned by lisa_dist.backends.deepspeed.initialize, not engine.optimizer), so its buffers stay "
                      "allocated after the LISA switch", RuntimeWarning, stacklevel=2)


def _restore(engine, keys: Sequence[GroupKey], kept: Dict[GroupKey, GroupShards],
             host: Optional[Dict[GroupKey, GroupShards]]) -> None:
    """Copy saved shards into the new optimizer's partitions; consumes `kept` and used `host` entries
    (a function of its own so no local outlives it holding an old buffer)."""
    basic = engine.basic_optimizer
    fresh = group_shards(engine, keys)
    with torch.no_grad():
        for key in keys:
            saved = kept.pop(key, None)
            if saved is None and host is not None:
                saved = host.pop(key, None)
            if saved is None:
                continue
            target = fresh[key].parts
            assert [p.fp32.shape for p in saved.parts] == [p.fp32.shape for p in target], (
                f"group {key!r}: sub-group partitions {[tuple(p.fp32.shape) for p in target]} differ from the "
                f"saved {[tuple(p.fp32.shape) for p in saved.parts]}")
            for old_part, new_part in zip(saved.parts, target):
                fp32 = new_part.fp32
                fp32.copy_(old_part.fp32)
                if old_part.state:
                    basic.state[fp32] = {k: (v.to(fp32.device) if _is_flat_like(v, fp32) else v)
                                         for k, v in old_part.state.items()}
