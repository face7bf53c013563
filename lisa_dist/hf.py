"""Public entry point of the Hugging Face Trainer / TRL integration (lisa_dist/integrations/hf.py)."""
from lisa_dist.integrations.hf import LisaCallback

__all__ = ["LisaCallback"]
