"""FSDP2 backend: per-layer `fully_shard` units, LisaOptimizer on DTensors, the runner for
`lisa-train --backend fsdp2`, and DCP checkpoints with the LISA state."""
from lisa_dist.backends.fsdp.optimizer import FSDPLisaOptimizer
from lisa_dist.backends.fsdp.runner import FSDPRunner, init_distributed
from lisa_dist.backends.fsdp.shard import reshard_after_evaluation, shard_model

__all__ = ["FSDPLisaOptimizer", "FSDPRunner", "init_distributed", "reshard_after_evaluation", "shard_model"]
