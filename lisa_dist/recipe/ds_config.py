"""The DeepSpeed config of a `lisa-train --backend deepspeed` run: the JSON file with the run's flags applied."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

from lisa_dist.recipe.run_config import RunConfig


def resolve_ds_config(run: RunConfig, dtype: torch.dtype) -> Dict:
    """The JSON file owns the ZeRO stage, buckets, offload, optimizer type and betas; the flags own
    what a user tunes per run (batch, accumulation, LR, warm-up, clipping, precision), so one config
    file serves every model size and the command line never silently loses to the file."""
    path = Path(run.deepspeed)
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed {path}: no such file; the shipped configs are in ds_configs/")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed {path}: not valid JSON: {e}") from e
    cfg["train_micro_batch_size_per_gpu"] = run.batch_size
    cfg["gradient_accumulation_steps"] = run.grad_accum
    cfg.pop("train_batch_size", None)  # DeepSpeed derives it; a stale value would contradict the flags
    cfg["gradient_clipping"] = run.max_grad_norm
    cfg.setdefault("bf16", {})["enabled"] = dtype == torch.bfloat16
    if dtype == torch.float16:
        # The file may tune the scaler (initial_scale_power, loss_scale_window, hysteresis,
        # min_loss_scale); loss_scale 0 is DeepSpeed's dynamic scaling.
        fp16 = cfg.get("fp16") or {}
        cfg["fp16"] = {**fp16, "enabled": True, "loss_scale": fp16.get("loss_scale", 0)}
    else:
        cfg.pop("fp16", None)
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {}).update(lr=run.lr, weight_decay=run.weight_decay)
    sched = cfg.get("scheduler")
    if sched and sched.get("type") in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"):
        params = sched.setdefault("params", {})
        params["warmup_num_steps"] = run.warmup_steps
        if "warmup_max_lr" in params or sched["type"] != "WarmupCosineLR":
            params["warmup_max_lr"] = run.lr
        if sched["type"] in ("WarmupDecayLR", "WarmupCosineLR"):
            params["total_num_steps"] = run.steps
    return cfg
