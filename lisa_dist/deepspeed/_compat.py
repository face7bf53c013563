"""Every private DeepSpeed access of the LISA engine hook, in one place, behind a version pin.

The hook rebuilds DeepSpeed's ZeRO optimizer in place at each switch, which no public API offers.
The attributes used here were read in DeepSpeed 0.19.8 (DESIGN.md section 5); a release outside
the tested range may rename or restructure them, so the hook refuses it with a clear message rather
than corrupting training silently. Widen SUPPORTED (and setup.py) only after the distributed tests
pass on the new release.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from packaging.version import Version

SUPPORTED = ">=0.19.8,<0.20"
_MIN, _MAX = Version("0.19.8"), Version("0.20")


def check_deepspeed_version(installed: str | None = None) -> None:
    """Raise RuntimeError unless the installed DeepSpeed is in the tested range."""
    if installed is None:
        import deepspeed
        installed = deepspeed.__version__
    # DeepSpeed source builds append "+<git hash>"; the release is what matters.
    release = Version(Version(installed).base_version)
    if not _MIN <= release < _MAX:
        raise RuntimeError(
            f"lisa_dist's DeepSpeed hook is tested with deepspeed{SUPPORTED} but deepspeed {installed} is "
            f"installed. It rebuilds ZeRO optimizer internals that change between releases; install a "
            f"supported version (pip install 'deepspeed{SUPPORTED}') or use --backend fsdp2")


# --- engine ---------------------------------------------------------------------------------------

def configure_optimizer(engine, basic_optimizer: torch.optim.Optimizer) -> None:
    """Build a fresh ZeRO optimizer around `basic_optimizer` and install it as engine.optimizer
    (engine.py:2328-2367), then re-register the torch-style backward post hook that engine __init__
    registers only once (engine.py:772)."""
    engine._configure_optimizer(basic_optimizer, None)
    if engine._support_torch_style_backward:
        engine.optimizer.register_grad_acc_post_hook(engine._backward_post_hook)


def drop_engine_optimizer(engine) -> None:
    """Forget the ZeRO optimizer so its flat buffers can be freed. engine.basic_optimizer and
    engine.client_optimizer are kept: the hook re-fills that same torch optimizer object (so LR
    schedulers bound to it stay valid), and after its groups and state are cleared it references
    nothing of the old layout."""
    engine.optimizer = None


# --- ZeRO-1/2 optimizer (runtime/zero/stage_1_and_2.py) ----------------------------------------

def zero12_optimizer_class():
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    return DeepSpeedZeroOptimizer


def fp32_partitions(zero_optimizer) -> List[torch.Tensor]:
    """This rank's fp32 master partition per param group (stage_1_and_2.py:560)."""
    return zero_optimizer.single_partition_of_fp32_groups


def bit16_groups(zero_optimizer) -> List[List[torch.nn.Parameter]]:
    """The model params each group flattened (only those trainable when it was built, 423-434)."""
    return zero_optimizer.bit16_groups


def flat_bit16_buffers(zero_optimizer) -> List[torch.Tensor]:
    """The flat buffers the trainable params' .data view into (534, 889-899)."""
    return zero_optimizer.bit16_groups_flat


def destroy_zero12(zero_optimizer) -> None:
    """Remove grad hooks and hp mappings (753-767). The caller must already have moved every param
    out of the flat buffers."""
    zero_optimizer.destroy()
    # destroy() keeps the post hooks, which reference the engine's bound method.
    zero_optimizer.unregister_grad_acc_post_hooks()


def gradient_buffers(zero_optimizer) -> Dict[str, List[torch.Tensor]]:
    """Gradient storage owned by the ZeRO optimizer, by kind.

    "partition": gradients of this rank's partition (ZeRO-2's contiguous `grads_in_partition`, the
    reduced `averaged_gradients`); "buckets": reduction staging buffers (`ipg_buckets`, sized by
    reduce_bucket_size, a framework workspace rather than a model state).
    """
    partition: List[torch.Tensor] = []
    if getattr(zero_optimizer, "grads_in_partition", None) is not None:
        partition.append(zero_optimizer.grads_in_partition)
    for grads in zero_optimizer.averaged_gradients.values():
        if grads is None:
            continue
        partition.extend(grads if isinstance(grads, (list, tuple)) else [grads])
    buckets: List[torch.Tensor] = []
    for bucket in zero_optimizer.ipg_buckets.values():
        buckets.extend(bucket.buffer)
        buckets.extend(g for g in bucket.grads if torch.is_tensor(g))
    return {"partition": [t for t in partition if torch.is_tensor(t)], "buckets": buckets}


def load_ds_config(config) -> dict:
    """A DeepSpeed config given as a dict, a JSON/HJSON path or base64, read as DeepSpeed reads it."""
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config as _load
    return _load(config)
