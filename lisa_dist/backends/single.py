"""The single-process runner behind `lisa-train --backend single`: LisaOptimizer on one device."""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from lisa_dist import evaluation, vocab_rows
from lisa_dist.config import LisaConfig
from lisa_dist.devices import synchronize
from lisa_dist.memory import count_params, model_state_floor
from lisa_dist.optim import LisaOptimizer
from lisa_dist.outlier import resolve_calibration


class SingleRunner:
    """One optimizer step per `train_step`, gradient accumulation over the given micro-batches."""

    rank = 0
    world_size = 1

    stage = "single"

    def __init__(self, model: torch.nn.Module, lisa: LisaConfig, *, lr: float, weight_decay: float = 0.0,
                 warmup_steps: int = 0, max_grad_norm: float = 1.0, calibration: Optional[Any] = None):
        """`calibration`: batches, or a callable (rank, world_size) -> batches, for sampling="outlier"."""
        self.model = model
        self.device = next(model.parameters()).device
        self._attach_optimizer(LisaOptimizer(model, lisa, torch.optim.AdamW, lr=lr, weight_decay=weight_decay,
                                             calibration=resolve_calibration(calibration, 0, 1)),
                               warmup_steps, max_grad_norm)

    def _attach_optimizer(self, optimizer: LisaOptimizer, warmup_steps: int, max_grad_norm: float) -> None:
        """Linear warm-up schedule, clipping and the schedule log around a LisaOptimizer (shared with FSDP2)."""
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
        self.max_grad_norm = max_grad_norm
        self.schedule_log: List[Dict] = []
        self._log_switch(0.0)

    @property
    def active_layers(self):
        return self.optimizer.active_layers

    @property
    def switch_index(self) -> int:
        return self.optimizer.switch_index

    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _log_switch(self, seconds: float) -> None:
        self.schedule_log.append({"step": self.optimizer.optimizer_steps, "switch_index": self.switch_index,
                                  "active_layers": list(self.active_layers), "seconds": seconds,
                                  "optimizer_bytes": self.optimizer_state_bytes()})

    def train_step(self, micro_batches: List[Dict[str, torch.Tensor]]) -> float:
        self.model.train()
        total = 0.0
        for batch in micro_batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            loss = self.model(**batch).loss / len(micro_batches)
            loss.backward()
            total += loss.item()
        self._clip_and_step()
        return total

    def evaluate(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> Tuple[float, int]:
        """(sum of token losses, label tokens) over the batches, summed over ranks (FSDP2 too)."""
        return evaluation.loss_sums(self.model, batches, self.device, self.world_size)

    def _clip_and_step(self) -> None:
        """Clip, step (which may switch the active set), advance the LR schedule, log a switch."""
        self.optimizer.record_gradients()  # sampling="gradient" measures unclipped norms, as DeepSpeed does
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                           self.max_grad_norm)
        before = self.switch_index
        # A step that ends in a switch is timed on the device's clock (as the DeepSpeed hook times its
        # switch): the queued backward must not count, and the switch's own copies must.
        switching = (self.optimizer.optimizer_steps + 1) % self.optimizer.config.interval_steps == 0
        if switching:
            synchronize(self.device)
        start = time.perf_counter()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        if self.switch_index != before:
            synchronize(self.device)
            self._log_switch(time.perf_counter() - start)

    def optimizer_state_bytes(self) -> int:
        b = self.optimizer.state_bytes()
        return b["master"] + b["optimizer_state"]

    def full_finetune_state_bytes(self) -> int:
        """What AdamW over every parameter would hold per rank (fp32 master if the weights are not
        fp32, and two moments; docs/design.md#memory-floors)."""
        counts = count_params(self.optimizer.split)
        weight_bytes = next(self.model.parameters()).element_size()
        floor = model_state_floor(self.stage, counts.total, counts.total, self.world_size, weight_bytes=weight_bytes)
        return int(floor["master"] + floor["optimizer_state"])

    # --- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, directory, step: int) -> None:
        """Weights as safetensors; LisaOptimizer (schedule, masters, moments, offloaded host copies),
        LR schedule and RNG as plain tensors and numbers, read back weights-only."""
        from safetensors.torch import save_model
        directory = Path(directory)
        save_model(self.model, str(directory / "model.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": torch.get_rng_state(), "step": step}, directory / "training_state.pt")

    def load_checkpoint(self, directory) -> int:
        """Restore a `save_checkpoint` directory; returns the step it was saved at."""
        from safetensors.torch import load_model
        directory = Path(directory)
        state = torch.load(directory / "training_state.pt", map_location="cpu", weights_only=True)
        try:
            load_model(self.model, str(directory / "model.safetensors"))
        except RuntimeError as e:  # missing/unexpected names or shapes
            raise ValueError(f"{directory}: the checkpoint holds another model ({e}); resume with the --model "
                             "that wrote it") from None
        self.optimizer.check_resumable(state["optimizer"]["lisa"], str(directory))  # e.g. another gamma or seed
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        self._log_switch(0.0)
        return int(state["step"])

    def save_pretrained(self, out_dir, tokenizer) -> None:
        # embedding_update="rows": the row deltas merged into the weights (a no-op otherwise)
        state = vocab_rows.merged_state_dict(self.model, self.model.state_dict())
        self.model.save_pretrained(out_dir, safe_serialization=True, state_dict=state)
        tokenizer.save_pretrained(out_dir)

    def close(self) -> None:
        del self.optimizer, self.scheduler, self.model
        gc.collect()
