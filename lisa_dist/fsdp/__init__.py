"""FSDP2 backend: per-layer `fully_shard` units, LisaOptimizer on DTensors, the runner for
`lisa-train --backend fsdp2`, and DCP checkpoints with the LISA state."""
from .optimizer import FSDPLisaOptimizer
from .runner import FSDPRunner, init_distributed
from .shard import shard_model

__all__ = ["FSDPLisaOptimizer", "FSDPRunner", "init_distributed", "shard_model"]
