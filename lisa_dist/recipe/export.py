"""`lisa-export CHECKPOINT_DIR OUT_DIR`: a DeepSpeed ZeRO-1/2/3 checkpoint written by a lisa_dist
engine (or by `lisa-train --save-steps`) to a consolidated Hugging Face model in safetensors, sharded
by `--max-shard-size`, that `AutoModelForCausalLM.from_pretrained(OUT_DIR)` loads.

Weights come from the fp32 masters in the optimizer files (deepspeed.utils.zero_to_fp32). Under
LISA most decoder layers are frozen at any moment; ZeRO-2/3 checkpoints carry them as frozen
fragments, but ZeRO-1 does not save them at all, so they are merged in from the module state
(model-states file), which ZeRO-1/2 write in full. Every torch.load runs weights-only.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional

import torch

from lisa_dist import vocab_rows
from lisa_dist.backends.deepspeed import _compat as ds_compat
from lisa_dist.serialization import weights_only_loads

_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def find_tag_dir(path: Path) -> Path:
    """Follow `latest` pointers (a lisa-train checkpoints root -> step-N -> DeepSpeed save dir -> tag)
    down to the directory holding the DeepSpeed files."""
    path = Path(path)
    for _ in range(4):
        if any((path / name).is_file() for name in _MODEL_STATES):
            return path
        latest = path / "latest"
        if not latest.is_file():
            break
        path = path / latest.read_text(encoding="utf-8").strip()
    raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint here (no {_MODEL_STATES[0]} nor a `latest` file "
                            "leading to one); pass a directory written by engine.save_checkpoint or "
                            "lisa-train --save-steps")


def consolidated_state_dict(tag_dir: Path) -> Dict[str, torch.Tensor]:
    """Full fp32 weights of every parameter (and persistent buffer) of the checkpointed model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads(ds_compat.checkpoint_safe_globals()):
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        model_states = tag_dir / _MODEL_STATES[0]
        if model_states.is_file():  # ZeRO-1/2: the module state is complete
            module = torch.load(model_states, map_location="cpu", weights_only=True)["module"]
            for name, value in module.items():
                # Masters win where they exist (fp32 even when training in bf16); the rest are
                # ZeRO-1's frozen layers, not in its optimizer files.
                if name not in state:
                    state[name] = value.float() if value.is_floating_point() else value
    return state


def _config(tag_dir: Path, model: Optional[str]):
    from transformers import AutoConfig

    if model is None:
        if (tag_dir / "config.json").is_file():
            return AutoConfig.from_pretrained(str(tag_dir))
        raise ValueError(f"{tag_dir} has no config.json; pass --model (the model directory, hub id or lisa-train "
                         "preset the checkpoint was trained from)")
    from lisa_dist.recipe import presets
    if model in presets.PRESETS:
        return presets.PRESETS[model](presets.default_tokenizer())
    return AutoConfig.from_pretrained(model)


def _tokenizer_dir(tag_dir: Path) -> Optional[Path]:
    # lisa-train keeps the tokenizer beside the backend's files: step-N/tokenizer, step-N/zero/<tag>.
    for d in (tag_dir, tag_dir.parent, tag_dir.parent.parent):
        if (d / "tokenizer" / "tokenizer_config.json").is_file():
            return d / "tokenizer"
    return None


def export(checkpoint_dir, out_dir, model: Optional[str] = None, max_shard_size: str = "5GB",
           dtype: str = "fp32") -> Path:
    """Write the consolidated model to out_dir and return it."""
    from transformers import AutoModelForCausalLM

    tag_dir = find_tag_dir(Path(checkpoint_dir))
    config = _config(tag_dir, model)
    state = consolidated_state_dict(tag_dir)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    state = {k: (v.to(target) if v.is_floating_point() else v) for k, v in state.items()}
    state = vocab_rows.merged_state_dict(hf_model, state)  # embedding_update="rows": deltas into the weights
    expected = set(hf_model.state_dict())
    missing = expected - set(state)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if missing - tied:
        raise ValueError(f"{tag_dir}: the checkpoint lacks {sorted(missing - tied)[:5]} (of {len(missing - tied)}); "
                         "is --model the architecture it was trained with?")
    hf_model.load_state_dict(state, strict=False, assign=True)
    if tied:
        hf_model.tie_weights()
    hf_model.config.dtype = target
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tok = _tokenizer_dir(tag_dir)
    if tok is not None:
        for f in tok.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lisa-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint_dir", help="engine.save_checkpoint directory or tag, a lisa-train step-N directory, "
                                          "or <output-dir>/checkpoints (follows `latest`)")
    p.add_argument("out_dir", help="where to write the Hugging Face model")
    p.add_argument("--model", help="architecture: model directory, hub id or lisa-train preset; default: the "
                                   "config.json saved with the checkpoint")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 5GB or 500MB")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="dtype of the exported weights")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint_dir, args.out_dir, args.model, args.max_shard_size, args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"lisa-export: error: {e}", file=sys.stderr)
        return 2
    print(f"lisa-export: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
