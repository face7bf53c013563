"""Importance-weighted sampling under DeepSpeed, as scenarios of the zero12 and zero3 check launches
(not a launched script of its own: each stage's existing launch runs these too).

- gradient: LisaConfig(sampling="gradient"); the per-layer statistics (moving averages, the open
  interval) are bit-identical on every rank, match the single-process LisaOptimizer on the global
  batch, the schedule is the reference's, and a checkpoint saved mid-interval resumes bit-identical.
- outlier: a tiny Llama with a planted outlier layer; each rank calibrates on its own batches; the
  ratios are identical on every rank, equal the single-process ones over all ranks' batches, rank
  the planted layer first, the schedule is the reference's, and a mid-interval checkpoint resumes
  bit-identical with the saved ratios (not those of the resuming model).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
from zero12_checks import BETAS, EPS, LR, WD, build_model, global_batch, rank_micro_batches

import lisa_dist.backends.deepspeed as lds
from ds_common import close
from lisa_dist.config import LisaConfig
from lisa_dist.optim import LisaOptimizer
from lisa_dist.outlier import outlier_ratios

PLANTED = 4


def gathered(module) -> torch.Tensor:
    import deepspeed
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):  # a no-op outside ZeRO-3
        return torch.cat([p.detach().double().flatten().clone() for p in params])


def same_on_all_ranks(value) -> bool:
    everyone: List = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, json.dumps(value, sort_keys=True))
    return all(e == everyone[0] for e in everyone)


def _step(engine, step: int) -> None:
    ids = rank_micro_batches(step, 1)[0]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def _reference(model, lisa: LisaConfig, steps: int, calibration=None):
    """The single-process LisaOptimizer on the global batch, and its schedule [(step, active)]."""
    opt = LisaOptimizer(model, lisa, torch.optim.AdamW, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                        calibration=calibration)
    schedule = [(0, list(opt.active_layers))]
    for step in range(steps):
        ids = global_batch(step, 1)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if opt.optimizer_steps % lisa.interval_steps == 0:
            schedule.append((opt.optimizer_steps, list(opt.active_layers)))
    return opt, schedule


def gradient(stage: int, out_dir: Path, ds_config: Callable[[], dict]) -> Dict:
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=5, sampling="gradient")
    steps, save_at = 11, 5  # K=2: step 5 is inside interval 2; 6 layers are all visited by step 6
    model = build_model()
    ref, ref_schedule = _reference(copy.deepcopy(model), lisa, steps)
    engine, _, _, _ = lds.initialize(model=model, config=ds_config(), lisa=lisa)
    save_dir = out_dir / f"importance_zero{stage}"
    per_step = []
    for step in range(steps):
        _step(engine, step)
        per_step.append(engine.lisa.importance.state_dict())
        if step + 1 == save_at:
            engine.save_checkpoint(str(save_dir), tag="mid")
    state = engine.lisa.importance.state_dict()
    straight = gathered(engine.module)
    schedule = [(e["step"], e["active_layers"]) for e in engine.lisa.schedule_log]
    close(engine)

    ref_state = ref.importance.state_dict()
    assert all(e is not None for e in state["ema"]), state
    rel = max(abs(a - b) / abs(b) for a, b in zip(state["ema"], ref_state["ema"]))
    assert rel < 1e-5, (state["ema"], ref_state["ema"])
    assert [list(e) for e in schedule] == [list(e) for e in ref_schedule], (schedule, ref_schedule)
    identical = same_on_all_ranks(per_step)
    assert identical, "gradient statistics differ between ranks"

    # resume mid-interval in a fresh engine (other initial weights: the checkpoint must supply them)
    engine, _, _, _ = lds.initialize(model=build_model(seed=7), config=ds_config(), lisa=lisa)
    engine.load_checkpoint(str(save_dir), tag="mid")
    assert engine.lisa.importance.state_dict() == per_step[save_at - 1]
    for step in range(save_at, steps):
        _step(engine, step)
    resumed = gathered(engine.module)
    resumed_state = engine.lisa.importance.state_dict()
    close(engine)
    assert torch.equal(resumed, straight), (resumed - straight).abs().max().item()
    assert resumed_state == state
    return {"ema": state["ema"], "reference_ema": ref_state["ema"], "ema_max_rel_diff": rel,
            "probabilities": state["probabilities"], "reference_probabilities": ref_state["probabilities"],
            "schedule": schedule, "reference_schedule": ref_schedule, "ranks_identical": identical,
            "resume_bit_identical": True, "pending_steps_at_save": per_step[save_at - 1]["pending_steps"]}


def planted_model(seed: int = 0):
    """Outsized weights on input channels with large inputs: eight in layer PLANTED, two in layer 1."""
    model = build_model(seed=seed)
    with torch.no_grad():
        model.model.layers[PLANTED].self_attn.q_proj.weight[:, :8] *= 40.0
        model.model.layers[1].self_attn.q_proj.weight[:, :2] *= 40.0
    return model


def outlier(stage: int, out_dir: Path, ds_config: Callable[[], dict]) -> Dict:
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=5, sampling="outlier", outlier_threshold=8.0)
    steps = 6
    # each rank calibrates on its own shard of two global batches
    calib_global = [{"input_ids": global_batch(900 + i, 1)} for i in range(2)]
    model = planted_model()
    ref_model = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    want = outlier_ratios(list(plain.model.layers), lambda b: plain(**b), calib_global, lisa.outlier_threshold)
    ref, ref_schedule = _reference(ref_model, lisa, steps, calibration=calib_global)
    numel = sum(m.weight.numel() for m in ref_model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))

    def calibration(rank: int, world: int):
        return [{"input_ids": rank_micro_batches(900 + i, 1)[0]} for i in range(2)]

    engine, _, _, _ = lds.initialize(model=model, config=ds_config(), lisa=lisa, calibration=calibration)
    got = list(engine.lisa.importance.outlier_ratios)
    save_dir, save_at = out_dir / f"outlier_zero{stage}", 3  # K=2: inside interval 1
    for step in range(steps):
        _step(engine, step)
        if step + 1 == save_at:
            engine.save_checkpoint(str(save_dir), tag="mid")
    schedule = [(e["step"], e["active_layers"]) for e in engine.lisa.schedule_log]
    straight = gathered(engine.module)
    close(engine)
    # resume from another init: its own calibration gives other ratios, the checkpoint's must win
    engine, _, _, _ = lds.initialize(model=planted_model(seed=7), config=ds_config(), lisa=lisa,
                                     calibration=calibration)
    fresh = list(engine.lisa.importance.outlier_ratios)
    engine.load_checkpoint(str(save_dir), tag="mid")
    assert list(engine.lisa.importance.outlier_ratios) == got
    for step in range(save_at, steps):
        _step(engine, step)
    resumed = gathered(engine.module)
    close(engine)
    assert fresh != got and torch.equal(resumed, straight), (resumed - straight).abs().max().item()
    identical = same_on_all_ranks(got)
    assert identical, got
    assert max(range(len(got)), key=lambda i: got[i]) == PLANTED, got
    # summation order differs from one process: at most an element on the threshold may flip
    assert max(abs(a - b) for a, b in zip(got, want)) <= 2.0 / numel, (got, want)
    assert [list(e) for e in schedule] == [list(e) for e in ref_schedule], (schedule, ref_schedule)
    return {"ratios": got, "reference_ratios": want, "ranks_identical": identical, "schedule": schedule,
            "reference_schedule": ref_schedule, "resume_bit_identical": True}

