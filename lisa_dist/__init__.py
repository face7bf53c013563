"""lisa_dist: LISA fine-tuning on DeepSpeed ZeRO and FSDP2."""
from .config import LisaConfig
from .sampling import LayerSampler, sample_layers

__all__ = ["LisaConfig", "LayerSampler", "sample_layers"]
