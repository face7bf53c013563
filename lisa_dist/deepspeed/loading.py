"""Build or load a model already partitioned for ZeRO-3, so no rank ever holds all of it.

A 70B model is 140 GB in bf16: materialising it on one rank before deepspeed.initialize
partitions it would need that much memory per process. transformers' DeepSpeed integration builds
the model under `deepspeed.zero.Init` instead (each module's parameters are partitioned as soon as
the module is constructed) when a `HfDeepSpeedConfig` object is alive:
- from_config (presets): random init runs per module on gathered parameters, on rank 0, and is
  broadcast (transformers.integrations.deepspeed.initialize_weights_zero3);
- from_pretrained: rank 0 reads the checkpoint and copies each module's tensors into the gathered
  parameters, which are re-partitioned module by module.
transformers holds that object only through a weak reference, so it is kept on the model for as
long as the model lives (resizing embeddings, generation and saving consult it too).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

from torch import nn


def load_partitioned(ds_config: dict, build: Callable[[], Tuple[nn.Module, Any]]
                     ) -> Optional[Tuple[nn.Module, Any]]:
    """`build()`'s (model, tokenizer), built or loaded under ZeRO-3 partitioning, or None when
    `ds_config` is not a ZeRO-3 config (the caller then builds the model whole). `ds_config` must be
    the resolved config the engine will be built from: zero.Init has to agree with it on precision
    and parameter offload. `build` constructs the model with from_config or from_pretrained, which
    transformers routes through zero.Init while the HfDeepSpeedConfig made here is alive.
    Initialises the process group (zero.Init partitions across it)."""
    if int((ds_config.get("zero_optimization") or {}).get("stage", 0)) != 3:
        return None
    import transformers
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from . import _compat, process_group

    _compat.check_deepspeed_version()
    process_group.ensure_initialized()
    hf_ds_config = HfDeepSpeedConfig(ds_config)
    assert hf_ds_config.is_zero3()

    model, tokenizer = build()
    whole = [n for n, p in model.named_parameters() if not hasattr(p, "ds_id")]
    if whole:
        raise RuntimeError(
            f"transformers {transformers.__version__} built {type(model).__name__} without ZeRO-3 partitioning "
            f"({len(whole)} parameters whole, e.g. {whole[0]}); its DeepSpeed integration "
            "(transformers.integrations.deepspeed.HfDeepSpeedConfig) did not take effect")
    model._lisa_hf_ds_config = hf_ds_config  # transformers keeps only a weak reference
    return model, tokenizer
