"""LISA on DeepSpeed ZeRO: an engine hook that makes only the sampled layers own fp32 master,
gradient partitions and optimizer state (stage 1, 2 and 3).

    engine, optimizer, _, scheduler = lisa_dist.backends.deepspeed.initialize(model=model, config=ds_config,
                                                                     lisa=LisaConfig(...))

Importing this package does not import DeepSpeed; the entry points check the installed version.
"""
from __future__ import annotations

__all__ = ["initialize", "model_state_bytes", "DeepSpeedRunner"]


def __getattr__(name: str):
    # Lazy, so `import lisa_dist.backends.deepspeed` works (and fails clearly later) without DeepSpeed.
    if name == "initialize":
        from lisa_dist.backends.deepspeed.engine_hook import initialize
        return initialize
    if name == "model_state_bytes":
        from lisa_dist.backends.deepspeed.state_bytes import model_state_bytes
        return model_state_bytes
    if name == "DeepSpeedRunner":
        from lisa_dist.backends.deepspeed.runner import DeepSpeedRunner
        return DeepSpeedRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
