"""`Runner`: what `lisa-train` needs from a backend, declared once.

The single-process, DeepSpeed and FSDP2 runners implement it; the recipe picks one and then only
talks to this interface, so its loop reads the same for every backend.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch

PathLike = Union[str, Path]


@runtime_checkable
class Runner(Protocol):
    rank: int
    world_size: int
    schedule_log: List[Dict[str, Any]]
    """One entry per switch: step, switch_index, active_layers, seconds, optimizer_bytes, ..."""

    @property
    def active_layers(self) -> Tuple[int, ...]:
        """The decoder layers training now."""

    @property
    def switch_index(self) -> int:
        """k of the current interval: the set is sampler.active_layers(k)."""

    def train_step(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> float:
        """One optimizer step over the micro-batches (on the host; the runner moves them to its device);
        returns the loss averaged over micro-batches and ranks."""

    def evaluate(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> Tuple[float, int]:
        """Held-out loss of the model as it is now, in eval mode without gradients (lisa_dist.evaluation):
        (sum of token losses, label tokens) over this rank's batches, summed over all ranks. Every rank
        passes the same number of batches (ZeRO-3 and FSDP2 forwards are collectives)."""

    def learning_rate(self) -> float:
        """The learning rate the next optimizer step will use (after warm-up or the schedule)."""

    def optimizer_state_bytes(self) -> int:
        """This rank's fp32 master + optimizer moments (+ gradient partitions) live now."""

    def full_finetune_state_bytes(self) -> int:
        """What full fine-tuning would hold per rank in the same categories (analytic)."""

    def save_checkpoint(self, directory: PathLike, step: int) -> None:
        """Write this rank's part of a resumable checkpoint into an existing directory."""

    def load_checkpoint(self, directory: PathLike) -> int:
        """Restore a save_checkpoint directory; returns the step it was saved at."""

    def save_pretrained(self, out_dir: PathLike, tokenizer: Any = None) -> None:
        """Write a Hugging Face model directory (rank 0), every rank taking part in any gather."""

    def close(self) -> None:
        """Free the model and optimizer before the process group goes away."""
