"""The embedded default: a shipped tokenizer and dataset plus tiny model shapes, all offline.

`lisa-train` with no model or data arguments trains PRESETS["tiny-llama"] from scratch on
DEFAULT_DATA, which exercises the whole LISA path on a laptop CPU in about two minutes.
Regenerate the assets with `python lisa_dist/recipe/assets/make_assets.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

from transformers import LlamaConfig, PreTrainedTokenizerFast

ASSETS_DIR: Path = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR: Path = ASSETS_DIR / "tokenizer"
DEFAULT_DATA: Path = ASSETS_DIR / "tiny_alpaca.jsonl"
"""1200 Alpaca-format examples, 120 for each of ten toy tasks (see assets/make_assets.py)."""
CHAT_DATA: Path = ASSETS_DIR / "tiny_chat.jsonl"
TEXT_DATA: Path = ASSETS_DIR / "tiny_text.jsonl"


def default_tokenizer() -> PreTrainedTokenizerFast:
    """The shipped 1024-token byte-level BPE: pad=0 <pad>, bos=1 <s>, eos=2 </s>, chat role markers
    <|system|> <|user|> <|assistant|>, and a chat template. Reads only local files."""
    return PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)


def tiny_llama_config(vocab_size: int, num_layers: int = 8, hidden_size: int = 128) -> LlamaConfig:
    """A Llama small enough to fine-tune on CPU (~1.7M parameters at the defaults) that still has
    enough decoder layers for layer sampling to matter.

    Keeps Llama's proportions: SwiGLU width 8/3 x hidden rounded up to a multiple of 8 (344 at 128),
    4 query heads sharing 2 KV heads (GQA, so KV projections are a different shape from Q/O),
    and untied embeddings so the input embeddings and the LM head are separate trainable tensors.
    """
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be divisible by the 4 attention heads, got {hidden_size}")
    if num_layers < 1 or vocab_size < 1:
        raise ValueError(f"num_layers and vocab_size must be >= 1, got {num_layers} and {vocab_size}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=8 * -(-hidden_size // 3),  # ceil(8/3 x hidden) to a multiple of 8
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        # Training never reuses a KV cache; generate(use_cache=True) still can.
        use_cache=False,
    )


def _tiny_llama(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    config = tiny_llama_config(len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config


PRESETS: Dict[str, Callable[[PreTrainedTokenizerFast], LlamaConfig]] = {
    "tiny-llama": _tiny_llama,
}
"""Model shapes by name: each takes the tokenizer (for vocabulary size and special ids) and
returns a config to build a randomly initialised model from. "tiny-llama" is the default."""
