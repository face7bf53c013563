"""Count every collective this process issues, at the process-group level, by op and phase.

Why the ProcessGroup methods and not torch.distributed's functions: DeepSpeed's torch backend
(deepspeed/comm/torch.py, 0.19.8) binds `all_gather_into_tensor` and `reduce_scatter_tensor` once at
start-up (`self.all_gather_function`, `self.reduce_scatter_function`), so patching the
torch.distributed module afterwards misses them, and deepspeed.comm's own functions nest (its
`reduce_scatter_fn` calls its `reduce_scatter_tensor`), so patching both levels double-counts.
Every eager c10d collective, whoever calls it (ZeRO's `dist.reduce` / `dist.all_reduce` buckets,
ZeRO-3's reduce-scatter and parameter all-gathers, FSDP2's `*_single` calls), ends in one method of
the group object (`group.allreduce([t], opts)` in distributed_c10d.py), so wrapping those methods on
the ProcessGroup class sees all of them once. DeepSpeed's shared-memory all-reduce
(`torch.ops.deepspeed.inference_all_reduce_`) bypasses the group; it is reached only through
`deepspeed.comm.inference_all_reduce`, which ZeRO does not call in 0.19.8 (no call site under
deepspeed/runtime/), and `count_collectives(deepspeed_shm=True)` counts it too, to prove that.

Bytes are the logical (unsharded) tensor of the op, the same figure whatever the algorithm: the
tensor for all-reduce / reduce / broadcast, the full input for a reduce-scatter, the full output for
an all-gather. Each rank counts its own calls.

The one collective counter of the repository: the benchmarks import it as `collective_count` (their
folder is their script's), the test scripts as `benchmarks.collective_count` (the repository root is
on their path), e.g. tests/scripts/fsdp2_checks.py for FSDP2's per-unit reduce-scatters.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist

# ProcessGroup method -> (op type, which positional argument holds the logical tensor(s))
_METHODS = {
    "allreduce": ("all_reduce", 0), "allreduce_coalesced": ("all_reduce", 0),
    "reduce": ("reduce", 0),
    "broadcast": ("broadcast", 0),
    "reduce_scatter": ("reduce_scatter", 1), "reduce_scatter_single": ("reduce_scatter", 1),
    "_reduce_scatter_base": ("reduce_scatter", 1), "reduce_scatter_single_coalesced": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 1),
    "allgather": ("all_gather", 0), "all_gather_single": ("all_gather", 0),
    "_allgather_base": ("all_gather", 0), "all_gather_single_coalesced": ("all_gather", 0),
    "allgather_into_tensor_coalesced": ("all_gather", 0), "allgather_coalesced": ("all_gather", 0),
}
REDUCTIONS = ("all_reduce", "reduce", "reduce_scatter")


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def _dtypes(x, out: set) -> set:
    if torch.is_tensor(x):
        out.add(str(x.dtype).replace("torch.", ""))
    elif isinstance(x, (list, tuple)):
        for y in x:
            _dtypes(y, out)
    return out


class CommLog:
    """calls[phase][op] = {"calls", "bytes", "dtypes", "sizes"}; `phase` is whatever the caller set."""

    def __init__(self):
        self.phase = "other"
        self.enabled = True
        self.calls: Dict[str, Dict[str, Dict]] = defaultdict(dict)

    def record(self, op: str, payload) -> None:
        if not self.enabled:
            return
        entry = self.calls[self.phase].setdefault(op, {"calls": 0, "bytes": 0, "dtypes": set(), "sizes": []})
        entry["calls"] += 1
        entry["bytes"] += _nbytes(payload)
        entry["sizes"].append(_nbytes(payload))
        _dtypes(payload, entry["dtypes"])

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    def clear(self) -> None:
        self.calls.clear()

    def sizes(self, op: str) -> List[int]:
        """Bytes of each call of `op`, in call order within each phase."""
        return [size for by_op in self.calls.values() if op in by_op for size in by_op[op]["sizes"]]

    def dtypes(self, op: str) -> List[str]:
        """The dtypes `op` carried ("float32", ...), over every phase."""
        return sorted({d for by_op in self.calls.values() if op in by_op for d in by_op[op]["dtypes"]})

    def bytes(self, ops=REDUCTIONS, phases=None) -> int:
        return sum(e["bytes"] for ph, by_op in self.calls.items() if phases is None or ph in phases
                   for op, e in by_op.items() if op in ops)

    def summary(self) -> Dict[str, Dict[str, Dict]]:
        return {ph: {op: {"calls": e["calls"], "bytes": e["bytes"], "dtypes": sorted(e["dtypes"]),
                          "largest": max(e["sizes"])} for op, e in sorted(by_op.items())}
                for ph, by_op in sorted(self.calls.items())}


@contextlib.contextmanager
def count_collectives(deepspeed_shm: bool = False) -> Iterator[CommLog]:
    """Record every collective issued inside the block; restore the originals on exit."""
    log = CommLog()
    group_cls = dist.ProcessGroup
    originals = {}
    for name, (op, arg) in _METHODS.items():
        fn = getattr(group_cls, name, None)
        if fn is None:
            continue

        def counted(self, *args, _fn=fn, _op=op, _arg=arg, **kwargs):
            log.record(_op, args[_arg] if len(args) > _arg else None)
            return _fn(self, *args, **kwargs)

        # Keep the class's own descriptor: pybind11 stores methods as instancemethod objects, and
        # getattr on the class unwraps them into plain functions that would no longer bind `self`.
        originals[name] = group_cls.__dict__.get(name)
        setattr(group_cls, name, counted)
    shm_original = None
    if deepspeed_shm:
        import deepspeed.comm as ds_comm
        shm_original = ds_comm.inference_all_reduce

        def shm_counted(tensor, *args, **kwargs):
            # torch.distributed fallback inside would count again as all_reduce; keep one record
            log.record("shm_all_reduce", tensor)
            log.enabled = False
            try:
                return shm_original(tensor, *args, **kwargs)
            finally:
                log.enabled = True

        ds_comm.inference_all_reduce = shm_counted
    try:
        yield log
    finally:
        for name, descriptor in originals.items():
            if descriptor is None:  # inherited: drop the wrapper to uncover it again
                delattr(group_cls, name)
            else:
                setattr(group_cls, name, descriptor)
        if shm_original is not None:
            import deepspeed.comm as ds_comm
            ds_comm.inference_all_reduce = shm_original
