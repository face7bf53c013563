"""Every private torch access of lisa_dist, each behind a probe: FSDP2's per-unit mixed-precision
init (the FSDP2 backend) and DDP's ignored parameters and sync flag (DDP under the HF integration).

FSDP2 fixes each unit's reduce dtype at its first forward (`FSDPParamGroup._init_mp_dtypes`, run
from lazy init) from the parameters that require grad *then*. A decoder layer that LISA freezes at
that moment and activates later would reduce-scatter its gradients in bf16 instead of the requested
fp32, silently. No public API re-runs that init, so this module does (torch 2.14+ derives a frozen
unit's dtype from its frozen parameters, so there the re-run is a no-op safeguard).

Outside the tested torch releases (lisa_dist/versions.py) the backend warns once and goes on; it
refuses only when a probe of what it touches fails (`check_torch`).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from lisa_dist.versions import IncompatibleReleaseError, Probe, check_release, missing_message, require, require_attrs


def _param_group_class():
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    return FSDPParamGroup


_PROBES = (
    Probe("torch.distributed.fsdp.FSDPModule._get_fsdp_state", lambda: callable(FSDPModule._get_fsdp_state)),
    Probe("torch.distributed.fsdp._fully_shard._fsdp_param_group.FSDPParamGroup._init_mp_dtypes",
          lambda: callable(_param_group_class()._init_mp_dtypes)),
)


_DDP_PROBES = (
    Probe("torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model",
          lambda: callable(_ddp()._set_params_and_buffers_to_ignore_for_model)),
)


def _ddp():
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel


def check_ddp() -> None:
    """Before DDP is set up around a LISA model: the private DDP entry points below exist."""
    check_release("torch", torch.__version__)
    require("torch", "ddp", _DDP_PROBES)


def check_torch() -> None:
    """At the FSDP2 backend's first use: warn outside the tested torch releases, refuse only when a
    probe of FSDP2's internals fails."""
    check_release("torch", torch.__version__)
    require("torch", "fsdp2", _PROBES)


def _param_groups(module: FSDPModule) -> List[object]:
    # torch 2.12+ keeps a list of groups per state (PR #173509; `_fsdp_param_group` became a property
    # that refuses several), 2.11 and before one optional group.
    fields = vars(module._get_fsdp_state())
    if "_fsdp_param_groups" in fields:
        return list(fields["_fsdp_param_groups"])
    if "_fsdp_param_group" in fields:
        group = fields["_fsdp_param_group"]
        return [group] if group is not None else []
    raise IncompatibleReleaseError(missing_message("torch", [(
        "torch.distributed.fsdp._fully_shard._fsdp_state.FSDPState._fsdp_param_groups (or _fsdp_param_group)",
        None)]))


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


def _dispatch_mode_class():
    from torch.utils._python_dispatch import TorchDispatchMode
    return TorchDispatchMode


_TRACE_PROBES = (
    Probe("torch.utils._python_dispatch.TorchDispatchMode", lambda: callable(_dispatch_mode_class())),
    Probe("torch.ops.aten._scaled_dot_product_flash_attention_for_cpu",
          lambda: callable(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)),
)


def dispatch_mode_class():
    """torch's base class for a mode that sees every operator call below autograd (forward, backward and
    optimizer ops alike, with their outputs): what the dry run's memory trace counts allocations with.
    No public API shows the backward's allocations on the meta device."""
    require("torch", "trace", _TRACE_PROBES)
    return _dispatch_mode_class()


def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
                    is_causal: bool, scale: Optional[float], dropout_p: float = 0.0) -> torch.Tensor:
    """The fused attention kernel (flash attention for CPUs) called directly: on the meta device
    `scaled_dot_product_attention` always takes the math path, which keeps the S x S probabilities for
    backward, while CPUs and GPUs run a fused kernel that keeps the output and a logsumexp row. It takes
    grouped key/value heads as they are (GQA) and a boolean or additive mask."""
    require("torch", "trace", _TRACE_PROBES)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def ddp_ignore_parameters(model, names: Sequence[str]) -> None:
    """Make a DistributedDataParallel built later over `model` leave these parameters alone (no
    broadcast, no gradient reduction): LISA reduces the active layers' gradients itself."""
    _ddp()._set_params_and_buffers_to_ignore_for_model(model, list(names))


def ddp_syncs_this_backward(ddp_model) -> bool:
    """False inside DDP's no_sync() (a gradient-accumulation micro-step that does not reduce)."""
    require_attrs("torch", ddp_model, "DistributedDataParallel", ("require_backward_grad_sync",))
    return bool(ddp_model.require_backward_grad_sync)
