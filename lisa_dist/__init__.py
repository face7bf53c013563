"""lisa_dist: LISA fine-tuning on DeepSpeed ZeRO and FSDP2."""
from lisa_dist.config import LisaConfig
from lisa_dist.layers import DecoderLayers, ParamSplit, find_decoder_layers, split_parameters
from lisa_dist.optim import LisaOptimizer
from lisa_dist.sampling import LayerSampler, sample_layers, sample_weighted

__version__ = "0.1.0"

__all__ = ["LisaConfig", "LayerSampler", "LisaOptimizer", "sample_layers", "sample_weighted",
           "DecoderLayers", "ParamSplit", "find_decoder_layers", "split_parameters", "__version__"]
