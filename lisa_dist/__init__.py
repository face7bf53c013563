"""lisa_dist: LISA fine-tuning on DeepSpeed ZeRO and FSDP2."""
from .config import LisaConfig
from .sampling import LayerSampler, sample_layers
from .layers import DecoderLayers, ParamSplit, find_decoder_layers, split_parameters

__all__ = ["LisaConfig", "LayerSampler", "sample_layers",
           "DecoderLayers", "ParamSplit", "find_decoder_layers", "split_parameters"]
