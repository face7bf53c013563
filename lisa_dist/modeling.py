"""The model and tokenizer of a `lisa-train` run: a preset with random init, or from_pretrained.

Recipe code: the backends receive the built model (and, for ZeRO-3, call the builder back under
zero.Init through `lisa_dist.deepspeed.loading.load_partitioned`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Tuple

import torch


def weights_dtype(choice: str) -> torch.dtype:
    """--dtype: bf16 or fp32; auto is bf16 where CUDA exists (bf16 matmuls are emulated on CPUs)."""
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return torch.bfloat16 if choice == "bf16" else torch.float32


def build_model_and_tokenizer(model: str, dtype: torch.dtype, *, seed: int = 0, tokenizer: Optional[str] = None,
                              trust_remote_code: bool = False) -> Tuple[torch.nn.Module, Any]:
    """Build a preset (seeded with `seed`) or call from_pretrained. Under ZeRO-3 the caller keeps
    transformers' HfDeepSpeedConfig alive so both paths construct the model partitioned."""
    import transformers

    from . import presets

    if model in presets.PRESETS:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer) if tokenizer else presets.default_tokenizer()
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(presets.PRESETS[model](tok), dtype=dtype), tok
    if not Path(model).is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"--model {model}: not a preset ({', '.join(presets.PRESETS)}) nor a local "
                                "directory, and HF_HUB_OFFLINE=1 forbids downloading it")
    built = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return built, tok
