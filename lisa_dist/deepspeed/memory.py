"""This rank's model-state bytes under DeepSpeed, measured from the tensors the engine holds.

Categories and counting rules: byte_count.py; ZeRO-3's own counter: zero3_memory.py.
"""
from __future__ import annotations

from typing import Dict

import torch

from . import _compat, zero3_memory
from .byte_count import MODEL_STATE_CATEGORIES, OTHER_CATEGORIES, add, state_tensors


def model_state_bytes(engine) -> Dict[str, int]:
    """Live bytes of this rank by category (MODEL_STATE_CATEGORIES + OTHER_CATEGORIES), plus
    "model_state", the sum of the model-state categories. Works for any ZeRO engine, with or
    without LISA (then there is no host_offload)."""
    if int(engine.zero_optimization_stage()) == 3:
        return zero3_memory.model_state_bytes(engine)
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
        return zero3_memory.optimizer_bytes(engine)
    out = {"bytes": 0}
    seen: set = set()
    zero = engine.optimizer
    add(out, seen, "bytes", _compat.fp32_partitions(zero))
    add(out, seen, "bytes", state_tensors(engine.basic_optimizer))
    add(out, seen, "bytes", _compat.gradient_buffers(zero)["partition"])
    return out["bytes"]
