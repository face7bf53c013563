"""The model and tokenizer of a `lisa-train` run: a preset with random init, or from_pretrained.

Recipe code: the backends receive the built model (and, for ZeRO-3, call the builder back under
zero.Init through `lisa_dist.backends.deepspeed.loading.load_partitioned`). FSDP2 gets an empty model instead
(`build_empty_model_and_tokenizer`, parameters on the meta device) plus a `weights_loader` that fills
each rank's shards after sharding, so no rank holds the whole model.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

import torch


def weights_dtype(choice: str) -> torch.dtype:
    """--dtype: bf16, fp32 or fp16; auto is bf16 where CUDA exists (bf16 matmuls are emulated on CPUs)."""
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[choice]


def build_model_and_tokenizer(model: str, dtype: torch.dtype, *, seed: int = 0, tokenizer: Optional[str] = None,
                              trust_remote_code: bool = False, device: Optional[torch.device] = None
                              ) -> Tuple[torch.nn.Module, Any]:
    """Build a preset (seeded with `seed`) or call from_pretrained. Under ZeRO-3 the caller keeps
    transformers' HfDeepSpeedConfig alive so both paths construct the model partitioned. With
    `device` (ZeRO-1/2: the rank's accelerator, or the CPU) a safetensors checkpoint is read onto it
    tensor by tensor in the target dtype, one file at a time, never as a whole host copy."""
    import transformers

    from lisa_dist.recipe import presets

    if model in presets.PRESETS:
        tok = _tokenizer(model, tokenizer, trust_remote_code)
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(presets.PRESETS[model](tok), dtype=dtype), tok
    _check_local(model)
    if device is not None and _has_safetensors(model):
        return _stream_whole(model, dtype, device, tokenizer, trust_remote_code)
    with _loading_errors(model):
        built = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype,
                                                                  trust_remote_code=trust_remote_code)
    return built, _tokenizer(model, tokenizer, trust_remote_code)


def _has_safetensors(model: str) -> bool:
    from lisa_dist.loading import SAFETENSORS_INDEX, SAFETENSORS_SINGLE

    return any((Path(model) / name).is_file() for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE))


def _stream_whole(model: str, dtype: torch.dtype, device: torch.device, tokenizer: Optional[str],
                  trust_remote_code: bool) -> Tuple[torch.nn.Module, Any]:
    """A whole model on `device`, filled tensor by tensor from the safetensors files. from_pretrained
    (transformers 5.24) converting an fp32 checkpoint to bf16 peaks at both whole copies on the host
    (796 MiB for a 537 MiB checkpoint, benchmarks/results/load_memory.md); here the host holds one
    mapped file at a time."""
    from lisa_dist import loading

    built, tok = build_empty_model_and_tokenizer(model, dtype, tokenizer=tokenizer,
                                                 trust_remote_code=trust_remote_code)
    loading.materialize(built, device)
    loading.load_safetensors(built, Path(model))
    built.eval()  # as from_pretrained returns it
    return built, tok


def build_empty_model_and_tokenizer(model: str, dtype: torch.dtype, *, tokenizer: Optional[str] = None,
                                    trust_remote_code: bool = False) -> Tuple[torch.nn.Module, Any]:
    """The model `build_model_and_tokenizer` would give, with its parameters on the meta device (no
    weights read or initialised; buffers real) and tied weights tied; fill it with `weights_loader`."""
    import transformers

    from lisa_dist.loading import meta_parameters

    tok = _tokenizer(model, tokenizer, trust_remote_code)
    config = _config(model, tok, trust_remote_code)
    with meta_parameters():
        built = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if (Path(model) / "generation_config.json").is_file():  # from_pretrained reads it too; export writes it back
        built.generation_config = transformers.GenerationConfig.from_pretrained(model)
    return built, tok


def checkpoint_files(model: str) -> Optional[List[Path]]:
    """The safetensors files of a local checkpoint directory; None for presets and other formats."""
    from lisa_dist.loading import safetensors_files
    from lisa_dist.recipe import presets

    if model in presets.PRESETS or not Path(model).is_dir() or not _has_safetensors(model):
        return None
    return safetensors_files(Path(model))


def build_from_config_and_tokenizer(model: str, dtype: torch.dtype, *, tokenizer: Optional[str] = None,
                                    trust_remote_code: bool = False) -> Tuple[torch.nn.Module, Any]:
    """A checkpoint's architecture, its parameters not initialised: built under ZeRO-3 (the caller's
    HfDeepSpeedConfig alive), whose loader then fills every partition from the files."""
    import transformers

    from lisa_dist.integrations.hf_compat import zero3_weight_init_skipped

    tok = _tokenizer(model, tokenizer, trust_remote_code)
    with zero3_weight_init_skipped():
        built = transformers.AutoModelForCausalLM.from_config(_config(model, tok, trust_remote_code), dtype=dtype,
                                                              trust_remote_code=trust_remote_code)
    return built, tok


def weights_loader(model: str, *, seed: int = 0, tokenizer: Optional[str] = None,
                   trust_remote_code: bool = False) -> Callable[[torch.nn.Module], None]:
    """Fills a sharded, materialized `build_empty_model_and_tokenizer` model with the weights
    `build_model_and_tokenizer` would have given it: a checkpoint's, read slice by slice, or a
    preset's seeded random init (built whole: presets are small, and their init must match the
    single-process build bit for bit, which per-shard init could not)."""
    from lisa_dist import loading
    from lisa_dist.recipe import presets

    if model in presets.PRESETS:
        def fill(sharded: torch.nn.Module) -> None:
            dtype = next(sharded.parameters()).dtype
            whole, _ = build_model_and_tokenizer(model, dtype, seed=seed, tokenizer=tokenizer)
            loading.load_state_dict(sharded, whole.state_dict())
        return fill
    _check_local(model)
    return lambda sharded: loading.load_safetensors(sharded, Path(model))


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""What the hub accepts as a repo id: `name` or `namespace/name`."""


def check_model_source(model: str, tokenizer: Optional[str] = None) -> None:
    """--model names a preset, an existing save_pretrained directory, or a hub id (and --tokenizer a
    tokenizer directory or id); anything else (a path that does not exist, a directory without
    config.json) fails here, before the hub client turns it into a traceback about repo ids."""
    from lisa_dist.recipe import presets

    if model not in presets.PRESETS:
        _check_source(model, "--model", ("config.json",),
                      f"a preset ({', '.join(presets.PRESETS)}), a directory written by save_pretrained, "
                      "or a Hugging Face id")
        _check_local(model)
    if tokenizer is not None:
        _check_source(tokenizer, "--tokenizer", ("tokenizer_config.json", "tokenizer.json"),
                      "a directory written by tokenizer.save_pretrained, or a Hugging Face id")


def _check_source(name: str, flag: str, markers: Tuple[str, ...], kinds: str) -> None:
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / m).is_file() for m in markers):
            raise ValueError(f"{flag} {name}: the directory holds no {' or '.join(markers)}, so save_pretrained did "
                             f"not write it; pass the folder that contains {markers[0]}")
        return
    if path.exists():
        raise ValueError(f"{flag} {name}: is a file; pass {kinds} (a folder, not a single file)")
    if not _HUB_ID.fullmatch(name) or name.startswith((".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{flag} {name}: no such directory; pass {kinds} "
                                "(check the path, or write the folder with save_pretrained first)")


@contextlib.contextmanager
def _loading_errors(model: str, flag: str = "--model"):
    """transformers raises OSError for a hub id it cannot fetch (no network, no such repo, gated);
    say what the flag must be instead of the hub client's traceback."""
    try:
        yield
    except OSError as err:
        raise ValueError(f"{flag} {model}: is not a local directory, and fetching it as a Hugging Face id failed "
                         f"({str(err).splitlines()[0]}); on a machine without the hub, download it elsewhere "
                         f"(huggingface-cli download {model} --local-dir DIR), copy DIR here and pass {flag} DIR"
                         ) from None


def _check_local(model: str) -> None:
    from lisa_dist.recipe import presets

    if not Path(model).is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"--model {model}: not a preset ({', '.join(presets.PRESETS)}) nor a local "
                                "directory, and HF_HUB_OFFLINE=1 forbids downloading it")


def check_vocabulary(model: torch.nn.Module, tokenizer, largest_id: int) -> None:
    """Token ids at or past the model's embedding rows (a tokenizer larger than the model's
    vocabulary) would fail as an IndexError mid-forward; refuse before training. Only the ids the
    data uses count: tokenizers often carry unused added tokens past the model's vocabulary (a
    Qwen2 tokenizer class adds <|endoftext|>) and those train fine."""
    weight = model.get_input_embeddings().weight
    rows = (getattr(weight, "ds_shape", None) or weight.shape)[0]  # ZeRO-3 partitions it in place
    if largest_id >= rows:
        raise ValueError(f"the data tokenizes to token id {largest_id}, but the model's input embeddings have {rows} "
                         f"rows (the tokenizer has {len(tokenizer)} tokens): the tokenizer does not belong to this "
                         "model; pass the model's own tokenizer (--tokenizer), or grow the embeddings first "
                         "(model.resize_token_embeddings(len(tokenizer)) then save_pretrained) "
                         "and train that directory")


def _config(model: str, tok, trust_remote_code: bool):
    import transformers

    from lisa_dist.recipe import presets

    if model in presets.PRESETS:
        return presets.PRESETS[model](tok)
    _check_local(model)
    if not Path(model).is_dir():
        raise ValueError(f"--model {model}: --backend fsdp2 reads checkpoints from a local directory; "
                         "download it first (huggingface-cli download --local-dir DIR) and pass DIR")
    with _loading_errors(model):
        return transformers.AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)


def _tokenizer(model: str, tokenizer: Optional[str], trust_remote_code: bool):
    import transformers

    from lisa_dist.recipe import presets

    if model in presets.PRESETS:
        if not tokenizer:
            return presets.default_tokenizer()
        with _loading_errors(tokenizer, "--tokenizer"):
            return transformers.AutoTokenizer.from_pretrained(tokenizer)
    with _loading_errors(tokenizer or model, "--tokenizer" if tokenizer else "--model"):
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer or model, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
