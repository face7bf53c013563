"""Models, checkpoints and DeepSpeed configs the tests build, written once. The launched scripts import
this by name too (launch_util.launch_env puts tests/support on their PYTHONPATH)."""
from __future__ import annotations

from typing import Optional, Union

import torch


def tiny_llama(layers: int = 6, hidden: int = 64, *, seed: int = 0, vocab: int = 256, max_positions: int = 64,
               dtype: Optional[torch.dtype] = None, **config):
    """The tiny Llama the checks train: 4 attention heads (2 KV heads), intermediate size 2 x hidden,
    initialised from `seed`, in `dtype` (fp32 when None); `config` sets further LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=max_positions, **config))
    return model if dtype is None else model.to(dtype)


def ds_config(stage: int, micro_batch: Union[int, str], *, gas: Union[int, str] = 1,
              train_batch: Union[int, str, None] = None, clip: Union[float, str] = 0.0, bf16: bool = False,
              optimizer: Optional[dict] = None, scheduler: Optional[dict] = None, **zero) -> dict:
    """A DeepSpeed config for the tiny models: buckets of 50,000 elements, so that even they fill
    several; `zero` adds or overrides zero_optimization keys. "auto" values are for the HF Trainer,
    which fills them in."""
    cfg = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": gas,
           "steps_per_print": 10 ** 9, "gradient_clipping": clip, "bf16": {"enabled": bf16},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 50_000, "allgather_bucket_size": 50_000,
                                 **zero}}
    if train_batch is not None:
        cfg["train_batch_size"] = train_batch
    if optimizer is not None:
        cfg["optimizer"] = optimizer
    if scheduler is not None:
        cfg["scheduler"] = scheduler
    return cfg


def write_checkpoint(directory, tied: bool, **shape) -> None:
    import transformers

    from lisa_dist.recipe import presets

    tok = presets.default_tokenizer()
    config = presets.tiny_llama_config(len(tok), **shape)
    config.tie_word_embeddings = tied
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size="8MB")
    tok.save_pretrained(directory)
