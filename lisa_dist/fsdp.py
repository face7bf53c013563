"""Public entry point of the FSDP2 backend (lisa_dist/backends/fsdp/)."""
from lisa_dist.backends.fsdp import FSDPLisaOptimizer, FSDPRunner, init_distributed, shard_model

__all__ = ["FSDPLisaOptimizer", "FSDPRunner", "init_distributed", "shard_model"]
