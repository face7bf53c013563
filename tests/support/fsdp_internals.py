"""What the FSDP2 checks ask of torch's FSDP2 beyond its public API. `unit_reduce_dtype` reads the
private `_reduce_dtype` of a unit's param groups (through the adapter's `_param_groups`), which tests
may do and lisa_dist does not."""
from __future__ import annotations

from typing import Optional

import torch
from torch.distributed.fsdp import FSDPModule

from lisa_dist.backends.torch_compat import _param_groups
from lisa_dist.versions import release_tuple


def frozen_units_keep_reduce_dtype(version: Optional[str] = None) -> bool:
    """True where FSDP2's lazy init gives a unit frozen at the first forward the requested reduce
    dtype anyway (torch 2.14+: derived from its frozen parameters, PR #187376); before, it is lost,
    and a layer activated later reduce-scatters in the parameter dtype unless refresh_mp_dtypes runs."""
    return release_tuple(version or torch.__version__)[:2] >= (2, 14)


def unit_reduce_dtype(unit: FSDPModule) -> Optional[torch.dtype]:
    """The dtype the unit will reduce-scatter in (None: no trainable params, or the grad dtype)."""
    if not any(p.requires_grad for p in unit.parameters()):
        # A frozen unit reduce-scatters nothing. torch 2.13 leaves its private field None, 2.14 fills
        # it from the frozen parameters; neither is sent.
        return None
    dtypes = {group._reduce_dtype for group in _param_groups(unit)}
    assert len(dtypes) == 1, dtypes
    return dtypes.pop()
