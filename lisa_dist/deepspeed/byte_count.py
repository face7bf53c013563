"""Live-byte accounting shared by the ZeRO-1/2 and ZeRO-3 model-state counters.

Each storage is counted once, in the first category that reaches it (trainable weights view the
ZeRO flat buffer, so the buffer, padding included, is counted as weights).
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch

MODEL_STATE_CATEGORIES = ("weights", "grads", "grad_partitions", "fp32_master", "optimizer_state")
"""Summed into "model_state"; DESIGN.md section 8's floor covers exactly these."""

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
