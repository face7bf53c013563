"""LISA-aware `engine.save_checkpoint` / `engine.load_checkpoint` (same signatures as DeepSpeed's).

A ZeRO checkpoint stores one fp32 partition and one Adam state per param group, in the layout of
the active set at save time; a fresh engine is built over the first set, so DeepSpeed alone fails
with a bare KeyError or a shape error, or silently loads moments into the wrong layer. Here:

- save: DeepSpeed writes to a hidden tag, then this adds the LISA schedule (client_state["lisa"] and
  the JSON sidecar `lisa_checkpoint.json`), the `offload` host slices (`lisa_host_rank<r>.pt`), each
  rank's random generator states (`lisa_rng_rank<r>.pt`: DeepSpeed saves none, so dropout would not
  resume exactly) and the model's `config.json` (so `lisa-export` needs no --model); only once every rank is done is the
  tag renamed into place and `latest` swapped (os.replace), so a kill mid-save leaves the previous
  checkpoint loadable and `latest` naming it;
- load: the sidecar is checked against this engine (model, gamma, K, seed, policy, world size, ZeRO
  stage) with a ValueError that says what differs, the optimizer is rebuilt over the saved active
  set, and only then DeepSpeed restores weights, masters, moments and the LR schedule; the random
  generators come back last (every torch.load weights-only).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from lisa_dist import rng
from lisa_dist.agreement import check_agreement
from lisa_dist.backends.deepspeed import _compat, zero12
from lisa_dist.config import check_resumable
from lisa_dist.serialization import load_tensors, weights_only_loads, write_text_atomic

SIDECAR = "lisa_checkpoint.json"
CLIENT_KEY = "lisa"
_FORMAT = 1


def host_file(rank: int) -> str:
    return f"lisa_host_rank{rank}.pt"


def rng_file(rank: int) -> str:
    return f"lisa_rng_rank{rank}.pt"


def model_fingerprint(module: torch.nn.Module) -> str:
    """Parameter names and full shapes (ZeRO-3 keeps the full one in ds_shape)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(f"{name}:{tuple(getattr(p, 'ds_shape', p.shape))};".encode())
    return h.hexdigest()[:16]


def describe(engine) -> Dict[str, Any]:
    """The LISA part of a checkpoint: enough to rebuild the optimizer layout and check a resume."""
    lisa = engine.lisa
    k = lisa.config.interval_steps
    return {"format": _FORMAT, "lisa_config": lisa.config.to_dict(), "num_layers": lisa.split.num_layers,
            "model_class": type(engine.module).__name__, "model_fingerprint": model_fingerprint(engine.module),
            "optimizer_steps": lisa.optimizer_steps, "switch_index": lisa.switch_index,
            "interval_position": lisa.optimizer_steps - lisa.switch_index * k,
            "active_layers": list(lisa.active_layers), "group_keys": list(lisa.group_keys),
            "host_layers": sorted(lisa.host) if lisa.host is not None else None,
            "world_size": dist.get_world_size(), "zero_stage": int(engine.zero_optimization_stage()),
            "global_steps": int(engine.global_steps), "rng_state": True,
            # the probability vector and the statistics behind it (moving averages, the open interval)
            "importance": lisa.importance.state_dict()}


def read_sidecar(tag_dir: Path) -> Dict[str, Any]:
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"no checkpoint at {tag_dir}")
    path = tag_dir / SIDECAR
    if not path.is_file():
        raise ValueError(f"{tag_dir} has no {SIDECAR}: it was not saved by a lisa_dist engine, so the LISA "
                         "optimizer layout cannot be rebuilt; load it with load_module_only=True for the weights")
    return json.loads(path.read_text(encoding="utf-8"))


def check_compatible(engine, saved: Dict[str, Any], where: Path, load_optimizer_states: bool = True) -> None:
    """ValueError naming every difference between the checkpoint and this engine that a resume
    cannot bridge; DeepSpeed would otherwise fail later with a bare KeyError or shape error. The
    LisaConfig fields and the number of decoder layers are compared by lisa_dist.config.check_resumable,
    as for every backend; the rest here."""
    now = describe(engine)
    diffs = []
    if saved.get("format") != _FORMAT:
        diffs.append(f"checkpoint format {saved.get('format')!r} (this lisa_dist reads {_FORMAT})")
    if saved["model_fingerprint"] != now["model_fingerprint"]:
        diffs.append(f"model: checkpoint {saved['model_class']} (parameters {saved['model_fingerprint']}) vs now "
                     f"{now['model_class']} (parameters {now['model_fingerprint']})")
    if saved["zero_stage"] != now["zero_stage"]:
        diffs.append(f"ZeRO stage: checkpoint {saved['zero_stage']} vs now {now['zero_stage']} (use the "
                     "DeepSpeed config the checkpoint was written with)")
    if load_optimizer_states and saved["world_size"] != now["world_size"]:
        diffs.append(f"world size: checkpoint {saved['world_size']} ranks vs now {now['world_size']} (ZeRO "
                     "partitions masters and moments per rank: resume on the same number of ranks, or export "
                     "the weights with lisa-export and start a new run from them)")
    check_resumable({**saved["lisa_config"], "num_layers": saved["num_layers"]}, engine.lisa.config,
                    engine.lisa.split.num_layers, str(where), diffs)


def _rank0() -> bool:
    return dist.get_rank() == 0


def save_checkpoint(engine, original, save_dir, tag=None, client_state={}, save_latest=True,
                    exclude_frozen_parameters=False):
    if not save_dir:
        raise ValueError(f"save_dir must be a non-empty path, got {save_dir!r}")
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    meta = describe(engine)
    partial = f".partial-{tag}"
    root = Path(save_dir)
    client = dict(client_state or {})
    client[CLIENT_KEY] = meta
    original(save_dir, tag=partial, client_state=client, save_latest=False,
             exclude_frozen_parameters=exclude_frozen_parameters)
    tmp = root / partial
    host = engine.lisa.host
    if host:
        # Each rank's slices of the layers parked on the host: part of the optimizer state under
        # state_policy="offload", invisible to DeepSpeed.
        torch.save({str(key): _slice_to_dict(s) for key, s in host.items()}, tmp / host_file(dist.get_rank()))
    torch.save(rng.capture(), tmp / rng_file(dist.get_rank()))
    if _rank0():
        config = getattr(engine.module, "config", None)
        if hasattr(config, "to_json_file"):
            config.to_json_file(str(tmp / "config.json"))
        write_text_atomic(tmp / SIDECAR, json.dumps(meta, indent=1))
    dist.barrier()
    if _rank0():
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_latest:
            write_text_atomic(root / "latest", tag)
    dist.barrier()
    return True


def _slice_to_dict(s) -> Dict[str, Any]:
    # ZeRO-1/2 park one GroupSlice per layer, ZeRO-3 a GroupShards of several (one per sub-group).
    if isinstance(s, zero12.GroupSlice):
        return {"fp32": s.fp32, "state": s.state}
    return {"parts": [_slice_to_dict(p) for p in s.parts]}


def _slice_from_dict(d: Dict[str, Any]):
    if "parts" in d:
        from lisa_dist.backends.deepspeed.zero3 import GroupShards
        return GroupShards([_slice_from_dict(p) for p in d["parts"]])
    return zero12.GroupSlice(d["fp32"], d["state"])


def _saved_host(tag_dir: Path, saved: Dict[str, Any]) -> Dict[zero12.GroupKey, Any]:
    if not saved["host_layers"]:
        return {}
    path = tag_dir / host_file(dist.get_rank())
    if not path.is_file():
        raise ValueError(f"{tag_dir} lists offloaded layers {saved['host_layers']} but has no {path.name}; "
                         "the checkpoint is incomplete, resume from an earlier one")
    raw = load_tensors(path)
    return {zero12.parse_key(k): _slice_from_dict(v) for k, v in raw.items()}


def _restore_rng(tag_dir: Path, saved: Dict[str, Any]) -> None:
    path = tag_dir / rng_file(dist.get_rank())
    if path.is_file():
        rng.restore(load_tensors(path))
    elif saved.get("rng_state"):
        raise ValueError(f"{tag_dir} was saved with random generator states but has no {path.name}; the "
                         "checkpoint is incomplete, resume from an earlier one")
    else:
        warnings.warn(f"{tag_dir} holds no random generator states (written by an older lisa_dist): training "
                      "continues, but dropout and other random draws will not follow the saved run", RuntimeWarning,
                      stacklevel=3)


def _move_to_saved_set(engine, saved: Dict[str, Any]) -> None:
    """Rebuild the ZeRO optimizer over the saved active set, so DeepSpeed's per-group restore meets
    the layout it saved."""
    lisa = engine.lisa
    active = tuple(saved["active_layers"])
    check_agreement(saved["switch_index"], active, lisa.device, (saved.get("importance") or {}).get("probabilities"))
    groups = lisa.groups(active)
    keys = [key for key, _ in groups]
    if keys != [zero12.parse_key(k) for k in saved["group_keys"]]:
        raise ValueError(f"the checkpoint's optimizer groups {saved['group_keys']} differ from this run's {keys} "
                         "for the same active layers: build the optimizer with the same parameter groups "
                         "(hyper-parameter sets) as the run that saved it")
    if keys != lisa.group_keys:
        # host=None: the groups of the fresh layout are discarded, DeepSpeed restores the saved ones.
        lisa.rebuild(engine, groups, None)
    lisa.group_keys = keys
    lisa.active_layers = active


def load_checkpoint(engine, original, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                    load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None
                    ) -> Tuple[Optional[str], Optional[dict]]:
    kwargs = dict(load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
                  load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
                  custom_load_fn=custom_load_fn)
    if tag is None:
        latest = Path(load_dir) / "latest"
        if not latest.is_file():
            return original(load_dir, tag=None, **kwargs)  # DeepSpeed warns and returns (None, None)
        tag = latest.read_text(encoding="utf-8").strip()
    tag_dir = Path(load_dir) / str(tag)
    saved = read_sidecar(tag_dir)
    restore = load_optimizer_states and not load_module_only
    check_compatible(engine, saved, tag_dir, load_optimizer_states=restore)
    lisa = engine.lisa
    if restore:
        _move_to_saved_set(engine, saved)
    with weights_only_loads(_compat.checkpoint_safe_globals()):
        path, client = original(load_dir, tag=str(tag), **kwargs)
    if client is not None:
        client.pop(CLIENT_KEY, None)
    if restore:
        lisa.optimizer_steps = saved["optimizer_steps"]
        lisa.switch_index = saved["switch_index"]
        if "importance" in saved:
            lisa.importance.load_state_dict(saved["importance"])
        if lisa.host is not None:
            lisa.host = _saved_host(tag_dir, saved)
        _restore_rng(tag_dir, saved)
        lisa.record(engine, 0.0)
        lisa.schedule_log[-1]["resumed_from"] = str(tag_dir)
    return path, client


def install(engine) -> None:
    """Replace engine.save_checkpoint / load_checkpoint by the LISA-aware versions."""
    engine.save_checkpoint = functools.wraps(engine.save_checkpoint)(
        functools.partial(save_checkpoint, engine, engine.save_checkpoint))
    engine.load_checkpoint = functools.wraps(engine.load_checkpoint)(
        functools.partial(load_checkpoint, engine, engine.load_checkpoint))
