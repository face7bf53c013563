"""Sharded checkpoints (torch.distributed.checkpoint) with the LISA state, and HF export.

A LISA optimizer's state has the shape of the active set at save time (and, under `offload`, of
the layers parked on the host), which a fresh optimizer does not have. DCP loads in place into
a template of the right shape, so `load` first reads the small JSON sidecar, moves the optimizer
to the saved set with materialised moments, and only then asks DCP to fill it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from lisa_dist import vocab_rows
from lisa_dist.backends.fsdp.optimizer import FSDPLisaOptimizer

SIDECAR = "lisa_checkpoint.json"
_FORMAT = 1


def _layout(value) -> Optional[list]:
    """Shape of a tensor entry, None for a non-tensor one (DCP restores those from the checkpoint)."""
    return list(value.shape) if torch.is_tensor(value) else None


def _offload_layout(optimizer: FSDPLisaOptimizer) -> Dict:
    return {str(i): {name: {"master": master is not None, "state": {k: _layout(v) for k, v in state.items()}}
                     for name, (master, state) in layer.items()}
            for i, layer in optimizer._offloaded.items()}


def _stateful(optim_state: Dict) -> List[int]:
    """Inner-optimizer indices that have state: right after a switch the newly active layers have
    none yet, and a resumed run must not give them any (their first step starts Adam afresh)."""
    return sorted(int(k) for k, v in optim_state["inner"]["state"].items() if v)


def _template(optimizer: FSDPLisaOptimizer, sidecar: Dict) -> Dict:
    """The optimizer's state dict shaped like the checkpoint's, for DCP's in-place load."""
    optimizer.prepare_for_load(tuple(sidecar["lisa"]["active_layers"]))
    optimizer._offloaded = _offload_template(optimizer, sidecar["offloaded"])
    template = optimizer.state_dict()
    if "stateful" in sidecar:  # older sidecars: every active parameter had state
        keep = set(sidecar["stateful"])
        template["inner"]["state"] = {k: v for k, v in template["inner"]["state"].items() if int(k) in keep}
    return template


def save(model: nn.Module, optimizer: FSDPLisaOptimizer, scheduler, directory: Path, step: int) -> None:
    optim_state = optimizer.state_dict()
    state = {"model": get_model_state_dict(model), "optim": optim_state,
             "scheduler": scheduler.state_dict(), "step": step}
    dcp.save(state, checkpoint_id=str(directory))
    if dist.get_rank() == 0:
        sidecar = {"format": _FORMAT, "step": step, "world_size": dist.get_world_size(),
                   "lisa": optim_state["lisa"], "offloaded": _offload_layout(optimizer),
                   "stateful": _stateful(optim_state)}
        (directory / SIDECAR).write_text(json.dumps(sidecar, indent=1))
    dist.barrier()


def read_sidecar(directory: Path) -> Dict:
    path = directory / SIDECAR
    if not path.is_file():
        raise ValueError(f"{directory} is not a lisa_dist FSDP2 checkpoint (no {SIDECAR}); pass the directory "
                         "written by FSDPRunner.save_checkpoint, or a Trainer checkpoint-N written with LisaCallback")
    return json.loads(path.read_text())


def _offload_template(optimizer: FSDPLisaOptimizer, layout: Dict) -> Dict:
    """Host-resident targets for the parked layers' masters and moments. DCP loads in place, so
    the template's device is where they end up: it must be the host, as when they were parked
    (LisaOptimizer moves them with .to("cpu")), not the parameters' accelerator."""
    params = {name: p for name, p in optimizer._model.named_parameters()}

    def like(name: str, shape: Optional[list]):
        if shape is None:
            return None
        p = params[name]
        if list(p.shape) == shape:  # a per-element tensor: sharded like its parameter
            return torch.zeros_like(p, dtype=torch.float32, device="cpu")
        return torch.zeros(shape, device="cpu")  # e.g. AdamW's scalar step, replicated

    return {int(i): {name: (like(name, list(params[name].shape)) if e["master"] else None,
                            {k: like(name, shape) for k, shape in e["state"].items()})
                     for name, e in layer.items()}
            for i, layer in layout.items()}


def load(model: nn.Module, optimizer: FSDPLisaOptimizer, scheduler, directory: Path) -> int:
    sidecar = read_sidecar(directory)
    lisa = sidecar["lisa"]
    optimizer.check_resumable(lisa, str(directory))
    state = {"model": get_model_state_dict(model), "optim": _template(optimizer, sidecar),
             "scheduler": scheduler.state_dict(), "step": -1}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    optimizer.load_state_dict(state["optim"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def save_optimizer(optimizer: FSDPLisaOptimizer, directory: Path) -> None:
    """The optimizer alone (masters, moments, LISA schedule) as a DCP directory with the sidecar:
    what Trainer and accelerate write beside their own model checkpoint under FSDP2."""
    directory = Path(directory)
    optim_state = optimizer.state_dict()
    dcp.save({"optim": optim_state}, checkpoint_id=str(directory))
    if dist.get_rank() == 0:
        sidecar = {"format": _FORMAT, "world_size": dist.get_world_size(), "lisa": optim_state["lisa"],
                   "offloaded": _offload_layout(optimizer), "stateful": _stateful(optim_state)}
        (directory / SIDECAR).write_text(json.dumps(sidecar, indent=1))
    dist.barrier()


def load_optimizer(optimizer: FSDPLisaOptimizer, directory: Path) -> None:
    """Restore a `save_optimizer` directory; the model weights must be loaded already."""
    directory = Path(directory)
    sidecar = read_sidecar(directory)
    lisa = sidecar["lisa"]
    optimizer.check_resumable(lisa, str(directory))
    state = {"optim": _template(optimizer, sidecar)}
    dcp.load(state, checkpoint_id=str(directory))
    optimizer.load_state_dict(state["optim"])


def export_pretrained(model: nn.Module, out_dir: Path, tokenizer=None) -> None:
    """Full weights gathered to rank 0's host memory, written as HF safetensors by rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        full = vocab_rows.merged_state_dict(model, full)  # embedding_update="rows": deltas into the weights
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, state_dict=full)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
    del full
    dist.barrier()
