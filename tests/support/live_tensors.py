"""How many bytes of tensors this process holds: the instrument behind the "switches free what they
replace" checks (flat live bytes over many switches)."""
from __future__ import annotations

import gc

import torch


def live_tensor_bytes() -> int:
    """Bytes of every live tensor storage in this process, each storage counted once.

    Counts parameters, gradients, optimizer state and anything else reachable, so compare it across
    switches, not against a floor.
    """
    gc.collect()
    seen = set()
    total = 0
    for obj in gc.get_objects():
        try:
            if not torch.is_tensor(obj) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
            key = (storage.data_ptr(), storage.device.type)
            nbytes = storage.nbytes()
        # Weakref proxies and lazy modules raise on attribute access; storages FSDP2 has freed
        # raise "invalid python storage". None of them hold memory.
        except Exception:
            continue
        if key in seen or key[0] == 0:
            continue
        seen.add(key)
        total += nbytes
    return total
