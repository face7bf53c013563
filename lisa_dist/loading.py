"""Fill an FSDP2 model built on the meta device, so no rank ever holds the whole model.

The model is constructed with its parameters on the meta device (`meta_parameters`), sharded with
`fully_shard` (FSDPRunner, per-layer units), given empty storage for its own shards only
(`materialize`) and then filled: `load_safetensors` reads, file by file, only the rows of each
tensor this rank owns (`safe_open(...).get_slice`), so a rank's host memory peaks at its shards plus
its rows of the one file being read (the file is memory-mapped while open); `load_state_dict`
copies a rank's rows out of a whole state dict (presets: small, randomly initialised shapes that
must equal the single-process build bit for bit).

Each rank reading its own rows was chosen over rank 0 reading and broadcasting (torchtune,
torchtitan): across all ranks the checkpoint is read once, with no collective per tensor.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Set

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from lisa_dist import vocab_rows

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Parameters registered inside land on the meta device; buffers stay real.

    Unlike `torch.device("meta")`, buffers computed at construction (rotary `inv_freq`, non-persistent
    and absent from checkpoints) keep their values, so nothing model-specific has to recompute them.
    Each parameter exists on the host only between its creation and its registration; transformers
    skips weight init during construction, so that storage is never touched."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def has_meta_parameters(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def materialize(model: nn.Module, device: torch.device) -> None:
    """Empty storage on `device` for every parameter (a sharded one gets only this rank's shard);
    buffers keep their values. The contents are undefined until a load fills them."""
    buffers = {name: b for name, b in model.named_buffers() if b.device.type != "meta"}
    first_name: Dict[int, str] = {}
    tied = {}  # to_empty gives each name its own tensor; tied weights must stay one
    for name, param in model.named_parameters(remove_duplicate=False):
        tied[name] = first_name.setdefault(id(param), name)
    model.to_empty(device=device)
    for name, first in tied.items():
        if name != first:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, model.get_parameter(first))
    with torch.no_grad():
        for name, empty in model.named_buffers():
            if name in buffers:
                empty.copy_(buffers[name])


def _rows(param: torch.Tensor) -> slice:
    """The rows of the whole tensor this rank holds: FSDP2 shards dim 0 as torch.chunk does."""
    if not isinstance(param, DTensor):
        return slice(None)
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"loading supports FSDP2's dim-0 sharding on a 1-D mesh, got {param.placements}")
    world, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
    n = param.shape[0]
    chunk = -(-n // world) if n else 0
    start, stop = min(rank * chunk, n), min((rank + 1) * chunk, n)
    assert param.to_local().shape[0] == stop - start, (param.to_local().shape, start, stop)
    return slice(start, stop)


def _targets(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Checkpoint key -> tensor to fill; tied parameters appear under each of their names."""
    targets: Dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    persistent = set(model.state_dict(keep_vars=True))  # parameters and persistent buffers
    targets.update((n, b) for n, b in model.named_buffers(remove_duplicate=False) if n in persistent)
    # A pretrained checkpoint has no row deltas (embedding_update="rows"): _reset_vocab_rows starts them.
    return {n: t for n, t in targets.items() if not n.startswith(vocab_rows.MODULE_NAME + ".")}


def _reset_vocab_rows(model: nn.Module) -> None:
    rows = vocab_rows.find(model)
    if rows is not None:
        rows.reset_parameters()


@torch.no_grad()
def _fill(model: nn.Module, keys: Callable[[], List[str]], read: Callable[[str, slice], torch.Tensor],
          filled: Set[int], targets: Mapping[str, torch.Tensor]) -> None:
    for key in keys():
        target = targets.get(key)
        if target is None or id(target) in filled:
            continue  # not part of the model (transformers ignores such keys too), or a tied copy
        rows = _rows(target)
        local = target.to_local() if isinstance(target, DTensor) else target
        if local.numel():
            local.copy_(read(key, rows))
        filled.add(id(target))


def _check_complete(model: nn.Module, targets: Mapping[str, torch.Tensor], filled: Set[int], where: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n, t in targets.items() if id(t) not in filled and n in params]
    if missing:
        raise ValueError(f"{where} has no tensor for {len(missing)} parameters of {type(model).__name__} "
                         f"(e.g. {missing[:3]}); is it a checkpoint of this architecture?")


def safetensors_files(directory: Path) -> List[Path]:
    """The checkpoint's safetensors files: the index's shards, or the single model.safetensors."""
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / f for f in sorted(set(weight_map.values()))]
    if (directory / SAFETENSORS_SINGLE).is_file():
        return [directory / SAFETENSORS_SINGLE]
    raise ValueError(f"--model {directory}: --backend fsdp2 loads safetensors checkpoints ({SAFETENSORS_SINGLE} "
                     f"or {SAFETENSORS_INDEX}) and there is none; re-save it with save_pretrained(..., "
                     "safe_serialization=True)")


def load_safetensors(model: nn.Module, directory: Path) -> None:
    """Fill a materialized (sharded) model from a Hugging Face safetensors checkpoint, one file at a
    time, reading only this rank's rows of each tensor. Dtypes convert as from_pretrained's do."""
    from safetensors import safe_open

    targets, filled = _targets(model), set()
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            _fill(model, lambda: list(f.keys()), lambda key, rows: f.get_slice(key)[rows], filled, targets)
    _check_complete(model, targets, filled, str(directory))
    _reset_vocab_rows(model)


def load_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Fill a materialized (sharded) model with this rank's rows of each tensor of a whole state dict."""
    targets, filled = _targets(model), set()
    _fill(model, lambda: list(state), lambda key, rows: state[key][rows], filled, targets)
    _check_complete(model, targets, filled, "the state dict")
    _reset_vocab_rows(model)
