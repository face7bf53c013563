"""Every private torch access of the FSDP2 backend, behind one version gate.

FSDP2 fixes each unit's reduce dtype at its first forward (`FSDPParamGroup._init_mp_dtypes`, run
from lazy init) from the parameters that require grad *then*. A decoder layer that LISA freezes at
that moment and activates later would reduce-scatter its gradients in bf16 instead of the requested
fp32, silently. No public API re-runs that init, so this module does (torch 2.14 derives a frozen unit's dtype
from its frozen parameters, so there the re-run is a no-op safeguard), and only for the torch range
it was tested against (2.13.0+cpu and 2.14.1 on CPU, gloo: every FSDP2 test of the suite). Elsewhere
it refuses to run.
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

TESTED_TORCH = ((2, 13), (2, 15))  # [min, max) of (major, minor)
_OVERRIDE_ENV = "LISA_DIST_UNTESTED_TORCH"


def _torch_minor(version: str) -> tuple:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_torch_version(version: Optional[str] = None) -> None:
    """Raise unless torch is in the tested range (set LISA_DIST_UNTESTED_TORCH=1 to try another)."""
    version = version or torch.__version__
    lo, hi = TESTED_TORCH
    if lo <= _torch_minor(version) < hi or os.environ.get(_OVERRIDE_ENV) == "1":
        return
    raise RuntimeError(
        f"lisa_dist's FSDP2 backend re-runs FSDP2's private mixed-precision init after each LISA switch "
        f"(torch.distributed.fsdp._fully_shard: FSDPState._fsdp_param_groups, FSDPParamGroup._init_mp_dtypes) "
        f"and is tested with torch {lo[0]}.{lo[1]}.x-{hi[0]}.{hi[1] - 1}.x only; this is torch {version}. Install torch "
        f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}, or set {_OVERRIDE_ENV}=1 to run anyway and check with "
        f"`pytest -m distributed tests/test_fsdp2.py` that layers activated after the first forward "
        f"still reduce in fp32")


def frozen_units_keep_reduce_dtype(version: Optional[str] = None) -> bool:
    """True where FSDP2's lazy init gives a unit frozen at the first forward the requested reduce
    dtype anyway (torch 2.14+: derived from its frozen parameters); on 2.13 it is lost, and a layer
    activated later reduce-scatters in the parameter dtype unless refresh_mp_dtypes runs."""
    return _torch_minor(version or torch.__version__) >= (2, 14)


def _param_groups(module: FSDPModule) -> List[object]:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        raise RuntimeError(f"torch {torch.__version__}: FSDPState has no _fsdp_param_groups; "
                           "lisa_dist/fsdp/_compat.py needs updating for this release")
    return list(groups)


def fsdp_units(model: nn.Module) -> Iterator[FSDPModule]:
    for module in model.modules():
        if isinstance(module, FSDPModule):
            yield module


def refresh_mp_dtypes(model: nn.Module) -> None:
    """Recompute every unit's reduce/orig dtype from the current `requires_grad` flags.

    Must run after any change of the trainable set and before the next backward. Idempotent, and
    harmless before the first forward (lazy init runs the same code again).
    """
    for unit in fsdp_units(model):
        for group in _param_groups(unit):
            group._init_mp_dtypes()


def unit_reduce_dtype(unit: FSDPModule) -> Optional[torch.dtype]:
    """The dtype the unit will reduce-scatter in (None: no trainable params, or the grad dtype)."""
    if not any(p.requires_grad for p in unit.parameters()):
        # A frozen unit reduce-scatters nothing. torch 2.13 leaves its private field None, 2.14 fills
        # it from the frozen parameters; neither is sent.
        return None
    dtypes = {group._reduce_dtype for group in _param_groups(unit)}
    assert len(dtypes) == 1, dtypes
    return dtypes.pop()
