"""This rank's model-state bytes under DeepSpeed ZeRO-1/2/3, measured from the tensors the engine holds.

Each storage is counted once, in the first category that reaches it (trainable weights view the
ZeRO flat buffer, so the buffer, padding included, is counted as weights). Under ZeRO-3, weights
are what this rank holds of every parameter: its partition (`ds_tensor`; the trainable ones view
the optimizer's flat bf16 buffer) plus whatever is gathered at the moment (persistent small params,
or params in flight during a step). Under offload_param / offload_optimizer the same tensors live
in host memory; on a CPU run there is no difference to measure, so they count in the same categories.
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch

from lisa_dist.backends.deepspeed import _compat

MODEL_STATE_CATEGORIES = ("weights", "grads", "grad_partitions", "fp32_master", "optimizer_state")
"""Summed into "model_state"; The floor of docs/design.md#memory-floors covers exactly these."""

OTHER_CATEGORIES = ("comm_buckets", "host_offload")
"""Reported, not summed: reduction staging buffers (sized by reduce_bucket_size, a workspace) and
the host copies `state_policy="offload"` parks deactivated layers in."""


def storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return s.data_ptr(), s.device.type, s.device.index


def add(out: Dict[str, int], seen: set, category: str, tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.device.type == "meta":
            continue
        key = storage_key(t)
        if key[0] == 0 or key in seen:
            continue
        seen.add(key)
        out[category] += t.untyped_storage().nbytes()


def state_tensors(optimizer: torch.optim.Optimizer):
    return [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]


def model_state_bytes(engine) -> Dict[str, int]:
    """Live bytes of this rank by category (MODEL_STATE_CATEGORIES + OTHER_CATEGORIES), plus
    "model_state", the sum of the model-state categories. Works for any ZeRO engine, with or
    without LISA (then there is no host_offload)."""
    if int(engine.zero_optimization_stage()) == 3:
        return _zero3_model_state_bytes(engine)
    out = {c: 0 for c in MODEL_STATE_CATEGORIES + OTHER_CATEGORIES}
    seen: set = set()
    zero = engine.optimizer
    params = list(engine.module.parameters())
    add(out, seen, "weights", params)
    add(out, seen, "grads", [p.grad for p in params] + [getattr(p, "grad_accum", None) for p in params])
    grads = _compat.gradient_buffers(zero)
    add(out, seen, "grad_partitions", grads["partition"])
    add(out, seen, "fp32_master", _compat.fp32_partitions(zero))
    add(out, seen, "optimizer_state", state_tensors(engine.basic_optimizer))
    add(out, seen, "comm_buckets", grads["buckets"])
    lisa = getattr(engine, "lisa", None)
    if lisa is not None and lisa.host is not None:
        add(out, seen, "host_offload", [t for s in lisa.host.values()
                                         for t in [s.fp32, *s.state.values()] if torch.is_tensor(t)])
    out["model_state"] = sum(out[c] for c in MODEL_STATE_CATEGORIES)
    return out


def optimizer_bytes(engine) -> int:
    """This rank's fp32 master partitions + optimizer state + gradient partitions, the part of the
    model state that LISA shrinks (cheap enough to log at every switch)."""
    if int(engine.zero_optimization_stage()) == 3:
        return _zero3_optimizer_bytes(engine)
    out = {"bytes": 0}
    seen: set = set()
    zero = engine.optimizer
    add(out, seen, "bytes", _compat.fp32_partitions(zero))
    add(out, seen, "bytes", state_tensors(engine.basic_optimizer))
    add(out, seen, "bytes", _compat.gradient_buffers(zero)["partition"])
    return out["bytes"]


def _zero3_model_state_bytes(engine) -> Dict[str, int]:
    out = {c: 0 for c in MODEL_STATE_CATEGORIES + OTHER_CATEGORIES}
    seen: set = set()
    zero = engine.optimizer
    params = list(engine.module.parameters())
    # The flat bf16 buffers first, so the trainable partitions viewing them count them once, whole.
    add(out, seen, "weights", _compat.zero3_lp_buffers(zero))
    add(out, seen, "weights", [p.ds_tensor for p in params] + params)
    add(out, seen, "grads", [p.grad for p in params])
    grads = _compat.zero3_gradient_buffers(zero)
    add(out, seen, "grad_partitions", grads["partition"])
    add(out, seen, "fp32_master", _compat.zero3_fp32_partitions(zero))
    add(out, seen, "optimizer_state", state_tensors(engine.basic_optimizer))
    add(out, seen, "comm_buckets", grads["buckets"])
    lisa = getattr(engine, "lisa", None)
    if lisa is not None and lisa.host is not None:
        add(out, seen, "host_offload", [t for s in lisa.host.values() for t in s.tensors()])
    out["model_state"] = sum(out[c] for c in MODEL_STATE_CATEGORIES)
    return out


def _zero3_optimizer_bytes(engine) -> int:
    """fp32 master partitions + optimizer state + gradient partitions of this rank."""
    out = {"bytes": 0}
    seen: set = set()
    zero = engine.optimizer
    add(out, seen, "bytes", _compat.zero3_fp32_partitions(zero))
    add(out, seen, "bytes", state_tensors(engine.basic_optimizer))
    add(out, seen, "bytes", _compat.zero3_gradient_buffers(zero)["partition"])
    return out["bytes"]
