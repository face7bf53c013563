"""DeepSpeedRunner: the DeepSpeed ZeRO-1/2 runner behind `lisa-train --backend deepspeed`."""
from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from lisa_dist import evaluation, vocab_rows
from lisa_dist.backends.deepspeed import _compat, process_group
from lisa_dist.backends.deepspeed.engine_hook import initialize
from lisa_dist.backends.deepspeed.state_bytes import model_state_bytes, optimizer_bytes
from lisa_dist.config import LisaConfig
from lisa_dist.memory import count_params, model_state_floor


class DeepSpeedRunner:
    """One optimizer step per `train_step`, over however many micro-batches it is given.

    The DeepSpeed config supplies precision, ZeRO stage, optimizer, LR schedule and clipping; its
    `gradient_accumulation_steps` is overridden by the number of micro-batches passed to each
    `train_step` (the accumulation boundary is set explicitly).
    """

    def __init__(self, model: nn.Module, lisa_config: LisaConfig, ds_config: Union[dict, str], *,
                 calibration: Optional[Any] = None):
        """`calibration`: batches, or a callable (rank, world_size) -> batches, for sampling="outlier"."""
        _compat.check_deepspeed()
        # ZeRO-3 loading may have started the group on the runner's behalf.
        self._owned_process_group = not (dist.is_available() and dist.is_initialized()) or process_group.started_here()
        self.engine, _, _, self.scheduler = initialize(model=model, config=ds_config, lisa=lisa_config,
                                                       distributed_port=process_group.master_port(),
                                                       calibration=calibration)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.lisa_config = lisa_config

    # --- schedule ----------------------------------------------------------------------------

    @property
    def active_layers(self) -> Tuple[int, ...]:
        return self.engine.lisa.active_layers

    @property
    def switch_index(self) -> int:
        return self.engine.lisa.switch_index

    @property
    def schedule_log(self) -> List[Dict]:
        return self.engine.lisa.schedule_log

    # --- training ------------------------------------------------------------------------------

    def train_step(self, micro_batches: List[Dict[str, torch.Tensor]]) -> float:
        """Forward with labels, backward and step per micro-batch; the last one is the optimizer
        step. Returns the loss averaged over micro-batches and ranks."""
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        engine = self.engine
        engine.train()
        total = torch.zeros((), dtype=torch.float32, device=engine.device)
        for i, batch in enumerate(micro_batches):
            engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch).loss
            # Scale here, not by the config's gradient_accumulation_steps: the mean over the
            # micro-batches actually given is the mean over the global batch.
            engine.backward(loss / len(micro_batches), scale_wrt_gas=False)
            engine.step()
            total += loss.detach().float()
        dist.all_reduce(total)
        return total.item() / (len(micro_batches) * self.world_size)

    def evaluate(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> Tuple[float, int]:
        """(sum of token losses, label tokens) over the batches, summed over ranks. Through the
        engine's forward, so ZeRO-3 gathers each module's parameters as training does."""
        return evaluation.loss_sums(self.engine, batches, self.engine.device, self.world_size)

    def learning_rate(self) -> float:
        return self.engine.get_lr()[0]

    # --- memory ----------------------------------------------------------------------------------

    def model_state_bytes(self) -> Dict[str, int]:
        return model_state_bytes(self.engine)

    def optimizer_state_bytes(self) -> int:
        """This rank's fp32 master + optimizer state + gradient partitions live now (between steps
        ZeRO holds no gradient partition, so this is master + moments)."""
        return optimizer_bytes(self.engine)

    def full_finetune_state_bytes(self) -> int:
        """Analytic per-rank fp32 master + Adam moments of full fine-tuning at this ZeRO stage and
        world size (docs/design.md#memory-floors). ZeRO keeps a separate fp32 master even for fp32 weights,
        hence weight_bytes=2 (4 bytes master + 8 bytes moments per parameter / N)."""
        counts = count_params(self.engine.lisa.split)
        stage = f"zero{self.engine.zero_optimization_stage()}"
        floor = model_state_floor(stage, counts.total, counts.total, self.world_size, weight_bytes=2)
        return int(floor["master"] + floor["optimizer_state"])

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, directory, step: int) -> None:
        """engine.save_checkpoint (LISA-aware, lisa_dist/deepspeed/checkpoint.py) under tag "zero"."""
        self.engine.save_checkpoint(str(directory), tag="zero", client_state={"lisa_train_step": step})

    def load_checkpoint(self, directory) -> int:
        """Restore a `save_checkpoint` directory (same model, LISA settings, stage and world size);
        returns the step it was saved at."""
        path, client = self.engine.load_checkpoint(str(directory), tag="zero")
        assert path is not None, f"DeepSpeed found no checkpoint in {directory}"
        return int(client["lisa_train_step"])

    # --- export and teardown -----------------------------------------------------------------

    def save_pretrained(self, out_dir, tokenizer=None) -> None:
        """Rank 0 writes a Hugging Face safetensors model. ZeRO-1/2 keep full weights on every rank;
        under ZeRO-3 every rank takes part in gathering them onto rank 0, one module at a time, so
        no rank holds more than one module's full weights on the device (rank 0 collects the whole
        model in host memory)."""
        state = _compat.zero3_consolidated_state_dict(self.engine) if self.engine.zero_optimization_stage() == 3 \
            else None
        if self.rank == 0:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            # Trainable weights are views into one ZeRO flat buffer; transformers would take views
            # sharing a storage for tied weights, so hand it independent host copies.
            if state is None:
                state = {k: v.detach().to("cpu", copy=True) for k, v in self.engine.module.state_dict().items()}
            state = vocab_rows.merged_state_dict(self.engine.module, state)  # embedding_update="rows"
            self.engine.module.save_pretrained(out, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(out)
        dist.barrier()

    def close(self) -> None:
        """Free the engine before the process group goes away, so the process exits cleanly
        (docs/design.md#pitfalls)."""
        engine = self.engine
        engine.destroy()
        engine.optimizer = None
        engine.lisa = None
        del self.engine, self.scheduler, engine
        gc.collect()
        if dist.is_initialized():
            dist.barrier()
            if self._owned_process_group:
                dist.destroy_process_group()
