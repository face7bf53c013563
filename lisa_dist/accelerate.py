"""Public entry point of the accelerate integration (lisa_dist/integrations/accelerate.py)."""
from lisa_dist.integrations.accelerate import LisaPrepared, prepare, prepared_state

__all__ = ["LisaPrepared", "prepare", "prepared_state"]
