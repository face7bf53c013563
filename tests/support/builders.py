"""Models, checkpoints and DeepSpeed configs the tests build, written once."""
from __future__ import annotations

import torch


def write_checkpoint(directory, tied: bool, **shape) -> None:
    import transformers

    from lisa_dist.recipe import presets

    tok = presets.default_tokenizer()
    config = presets.tiny_llama_config(len(tok), **shape)
    config.tie_word_embeddings = tied
    torch.manual_seed(1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size="8MB")
    tok.save_pretrained(directory)
