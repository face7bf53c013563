"""This rank's model-state bytes under ZeRO-3, in the categories of byte_count.

Weights are what this rank holds of every parameter: its partition (`ds_tensor`; the trainable
ones view the optimizer's flat bf16 buffer, counted whole, padding included) plus whatever is
gathered at the moment (persistent small params, or params in flight during a step). Under
offload_param / offload_optimizer the same tensors live in host memory; on a CPU run there is no
difference to measure, so they are counted in the same categories.
"""
from __future__ import annotations

from typing import Dict

from . import _compat
from .byte_count import MODEL_STATE_CATEGORIES, OTHER_CATEGORIES, add, state_tensors


def model_state_bytes(engine) -> Dict[str, int]:
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


def optimizer_bytes(engine) -> int:
    """fp32 master partitions + optimizer state + gradient partitions of this rank."""
    out = {"bytes": 0}
    seen: set = set()
    zero = engine.optimizer
    add(out, seen, "bytes", _compat.zero3_fp32_partitions(zero))
    add(out, seen, "bytes", state_tensors(engine.basic_optimizer))
    add(out, seen, "bytes", _compat.zero3_gradient_buffers(zero)["partition"])
    return out["bytes"]
