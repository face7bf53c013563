"""The held-out loss of an exported model, computed independently of lisa_dist.evaluation.

One example at a time (no padding, no batching, no ranks), in a fresh process's from_pretrained
model, with transformers' own causal-LM loss (the model's mean over an example's label tokens, times
their count): the token-weighted mean `lisa-train --eval-data` and Trainer.evaluate must report.
Masking is lisa-train's (lisa_dist.recipe.data.tokenize_example), as training masks.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

import torch


def reference_eval_loss(model_dir: Path, eval_file: Path, max_length: int, fmt: str = "auto") -> Tuple[float, int]:
    """(token-weighted mean loss, label tokens) of the model in `model_dir` over a JSONL `eval_file`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lisa_dist.recipe.data import IGNORE_INDEX, tokenize_example

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    total, count = 0.0, 0
    for line in Path(eval_file).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        example = tokenize_example(json.loads(line), tokenizer, max_length, fmt)
        labels = torch.tensor([example["labels"]])
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        if tokens == 0:
            continue
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([example["input_ids"]]), labels=labels).loss
        total += loss.double().item() * tokens
        count += tokens
    return total / count, count


def split_jsonl(source: Path, train: Path, held_out: Path, n_held_out: int) -> None:
    """The last n_held_out records of `source` into `held_out`, the rest into `train`."""
    lines = [line for line in Path(source).read_text(encoding="utf-8").splitlines() if line.strip()]
    train.write_text("\n".join(lines[:-n_held_out]) + "\n", encoding="utf-8")
    held_out.write_text("\n".join(lines[-n_held_out:]) + "\n", encoding="utf-8")
