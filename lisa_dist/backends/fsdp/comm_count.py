"""Count the collectives FSDP2 issues, by wrapping the public torch.distributed entry points.

Used by the tests and benchmarks to show that a frozen layer reduce-scatters nothing and that the
reduce-scatters that do happen carry fp32. Counting is per process (this rank's calls).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist

# FSDP2 in torch 2.13 calls the *_single variants; the others are their older public names.
_OPS = {"reduce_scatter": ("reduce_scatter_single", "reduce_scatter_tensor"),
        "all_gather": ("all_gather_single", "all_gather_into_tensor")}


@dataclass
class Call:
    op: str
    numel: int
    dtype: torch.dtype

    @property
    def bytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class CommLog:
    calls: List[Call] = field(default_factory=list)

    def of(self, op: str) -> List[Call]:
        return [c for c in self.calls if c.op == op]

    def summary(self) -> Dict[str, Dict[str, int]]:
        out: Dict[str, Dict[str, int]] = {}
        for op in _OPS:
            calls = self.of(op)
            out[op] = {"calls": len(calls), "bytes": sum(c.bytes for c in calls)}
        return out

    def clear(self) -> None:
        self.calls.clear()


@contextlib.contextmanager
def count_collectives() -> Iterator[CommLog]:
    """Record every reduce-scatter and all-gather issued inside the block (input size and dtype)."""
    log = CommLog()
    originals = {}

    def wrap(op: str, fn):
        def counted(*args, **kwargs):
            # The input is the full (unsharded) buffer for a reduce-scatter, the shard for an all-gather.
            tensor = kwargs.get("input", kwargs.get("input_tensor", args[1] if len(args) > 1 else None))
            log.calls.append(Call(op, tensor.numel(), tensor.dtype))
            return fn(*args, **kwargs)
        return counted

    for op, names in _OPS.items():
        for name in names:
            if hasattr(dist, name):
                originals[name] = getattr(dist, name)
                setattr(dist, name, wrap(op, originals[name]))
    try:
        yield log
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
