"""Every random generator a training step draws from, captured and restored per rank.

DeepSpeed's checkpoints hold weights, optimizer and LR schedule but no generator state, so after a
resume dropout masks (torch), data shuffles (python `random`, numpy) and device-side sampling start
from wherever the new process left them. The state is stored as plain tensors, numbers and
strings, so the file loads with weights_only=True.
"""
from __future__ import annotations

import random
import warnings
from typing import Any, Dict

import torch

_FORMAT = 1


def capture() -> Dict[str, Any]:
    """This process's generator states: python, numpy, torch CPU and the accelerator's device."""
    import numpy as np
    from deepspeed.accelerator import get_accelerator

    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    accelerator = get_accelerator()
    # The CPU accelerator's generator is torch's CPU generator itself.
    device = None if accelerator.device_name() == "cpu" else accelerator.get_rng_state()
    return {"format": _FORMAT,
            "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
            "torch": torch.get_rng_state(), "device_name": accelerator.device_name(), "device": device}


def restore(state: Dict[str, Any]) -> None:
    """Put back what `capture` returned (in another process of the same rank)."""
    import numpy as np
    from deepspeed.accelerator import get_accelerator

    assert state.get("format") == _FORMAT, f"unknown RNG state format {state.get('format')!r}"
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["device"] is not None:
        accelerator = get_accelerator()
        if accelerator.device_name() == state["device_name"]:
            accelerator.set_rng_state(state["device"])
        else:
            warnings.warn(f"the checkpoint's device RNG state is for {state['device_name']!r} but this run is on "
                          f"{accelerator.device_name()!r}: device-side randomness will not continue the saved run",
                          RuntimeWarning, stacklevel=2)
