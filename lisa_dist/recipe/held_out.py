"""`lisa-train --eval-data`: the held-out set, when to evaluate it, and the record of each evaluation.

The set is read and masked by lisa_dist.recipe.data exactly as the training data is (same
--data-format and --max-length); the runner computes the loss (lisa_dist.evaluation: summed token
losses and token counts, reduced over ranks), so the figure is the token-weighted mean over the whole
set for every backend and world size.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

from lisa_dist.protocol import Runner
from lisa_dist.recipe import data
from lisa_dist.recipe.run_config import RunConfig


class HeldOut:
    """Build with `HeldOut.load` before the runner (bad input fails before any engine is built), then
    `shard` once the rank is known."""

    def __init__(self, path: Path, dataset: List[Dict[str, List[int]]], batch_size: int, every: int, steps: int):
        self.path = path
        self.dataset = dataset
        self.batch_size = batch_size
        self.every = every
        self.steps = steps
        self.batches: Optional[List] = None
        self.evals: List[Dict] = []
        self.seconds = 0.0

    @classmethod
    def load(cls, run: RunConfig, tokenizer, train_path: Path) -> "HeldOut":
        """Tokenize --eval-data; ValueError / FileNotFoundError naming the flag for a missing or empty set,
        or records whose shape differs from the training data's (their loss would be masked differently)."""
        path = Path(run.eval_data)
        try:
            dataset = data.build_dataset(path, tokenizer, max_length=run.max_length, fmt=run.data_format,
                                         overlong=run.overlong)
            if run.data_format == "auto":
                held_out, train = data.dataset_formats(path), data.dataset_formats(train_path)
                if not held_out <= train:
                    raise ValueError(
                        f"it holds {_names(held_out - train)} records but --data {train_path} holds only "
                        f"{_names(train)}, so their loss would be masked differently from training's; give "
                        "held-out examples of the training data's shape (or name it with --data-format)")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"--eval-data: {err}") from None
        except ValueError as err:
            raise ValueError(f"--eval-data {path}: {err}") from None
        return cls(path, dataset, run.eval_batch_size or run.batch_size, run.eval_steps, run.steps)

    def max_token_id(self) -> int:
        return max(max(e["input_ids"]) for e in self.dataset)

    def shard(self, rank: int, world_size: int, pad_token_id: int) -> None:
        self.batches = data.eval_batches(self.dataset, self.batch_size, pad_token_id, rank, world_size)

    def due(self, step: int) -> bool:
        """Whether to evaluate after optimizer step `step` (counted from 1): every `every` steps and at
        the last. A resumed run starts after its checkpoint's step, whose evaluation (done before the
        checkpoint was written) it does not repeat."""
        return step == self.steps or (self.every > 0 and step % self.every == 0)

    def evaluate(self, runner: Runner, step: int) -> Dict:
        """Evaluate now (every rank), record and return {"step", "eval_loss", "eval_tokens", "seconds"}."""
        assert self.batches is not None, "HeldOut.shard() first"
        start = time.perf_counter()
        total, count = runner.evaluate(self.batches)
        entry = {"step": step, "eval_loss": total / count, "eval_tokens": count,
                 "seconds": time.perf_counter() - start}
        self.seconds += entry["seconds"]
        self.evals.append(entry)
        return entry

    def summary(self) -> Dict:
        """lisa_log.json's entries: every evaluation, and the last loss on its own."""
        out: Dict = {"evals": self.evals, "eval_data": str(self.path), "eval_seconds": self.seconds}
        if self.evals:
            out["eval_loss"] = self.evals[-1]["eval_loss"]
        return out


def _names(formats) -> str:
    return " and ".join(sorted(formats))
