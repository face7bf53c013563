"""What the ZeRO-3 checks ask of DeepSpeed beyond its public API: they read private attributes of
DeepSpeedZeRoOffload (runtime/zero/parameter_offload.py, 0.19.8), which tests may do and lisa_dist
does only through its adapter."""
from __future__ import annotations


def zero3_module_hook_count(parameter_offload) -> int:
    """Forward and backward module hooks DeepSpeedZeRoOffload registered (its `forward_hooks` and
    `backward_hooks` lists)."""
    return len(parameter_offload.forward_hooks) + len(parameter_offload.backward_hooks)
