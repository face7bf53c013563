"""FSDP2 backend checks, run by tests/distributed/test_fsdp2.py under `torchrun --nproc_per_node 2` (gloo, CPU).

    torchrun --nproc_per_node 2 tests/scripts/fsdp2_checks.py --phase main --workdir /tmp/x
    torchrun --nproc_per_node 2 tests/scripts/fsdp2_checks.py --phase resume --workdir /tmp/x

`main` runs every check and the first half of the resume check (saves a checkpoint and the
uninterrupted run's result); `resume` is a new process pair that loads the checkpoint, finishes
the run and compares bit for bit. Any failure raises, so the rank exits non-zero; each rank also
writes what it measured to WORKDIR/<phase>.rank<r>.json.
"""
from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from fsdp_internals import frozen_units_keep_reduce_dtype, unit_reduce_dtype  # noqa: E402
from live_tensors import live_tensor_bytes  # noqa: E402
from plan_prediction import dry_run_prediction  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from benchmarks.collective_count import count_collectives  # noqa: E402
from builders import tiny_llama  # noqa: E402
from lisa_dist.backends.fsdp import FSDPRunner  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.memory import count_params, model_state_floor  # noqa: E402
from lisa_dist.memory import local_tensor_bytes as local_bytes  # noqa: E402
from lisa_dist.optim import LisaOptimizer  # noqa: E402

VOCAB, LAYERS, GAMMA = 256, 6, 2
MICRO, BATCH, SEQ = 2, 2, 16  # micro-batches per step, sequences per micro-batch, tokens
RESUME_STEPS, RESUME_AT = 7, 3  # mid-interval (K=2), so the schedule position must survive too


def build_model(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> LlamaForCausalLM:
    return tiny_llama(LAYERS, 64, seed=seed, vocab=VOCAB, dtype=dtype)


def micro_batch(step: int, rank: int, micro: int) -> Dict[str, torch.Tensor]:
    """Deterministic data, regenerable by any rank (the reference needs every rank's batches)."""
    g = torch.Generator().manual_seed(100_000 * step + 100 * rank + micro)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def rank_batches(step: int, rank: int) -> List[Dict[str, torch.Tensor]]:
    return [micro_batch(step, rank, m) for m in range(MICRO)]


def full_state(model) -> Dict[str, torch.Tensor]:
    """Full weights on every rank (collective)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[fsdp2_checks] {msg}", flush=True)


# --- checks ---------------------------------------------------------------------------------------


OPTIMIZERS = {"adamw": (torch.optim.AdamW, {}), "sgd": (torch.optim.SGD, {"momentum": 0.9})}


def _reference(lisa: LisaConfig, dtype: torch.dtype, steps: int, lr: float, wd: float, world: int,
               opt_name: str, micro: bool = False):
    """Single-process LisaOptimizer on the global batch (all ranks' micro-batches): in one forward,
    or accumulated over the micro-batches with `micro` (to measure the reference's own noise)."""
    model = build_model(dtype=dtype)
    cls, kw = OPTIMIZERS[opt_name]
    opt = LisaOptimizer(model, lisa, cls, lr=lr, weight_decay=wd, **kw)
    losses, schedule = [], []
    for step in range(steps):
        schedule.append(list(opt.active_layers))
        batches = [b for r in range(world) for b in rank_batches(step, r)]
        if micro:
            total = 0.0
            for b in batches:
                loss = model(**b).loss / len(batches)
                loss.backward()
                total += loss.item()
        else:
            loss = model(**{k: torch.cat([b[k] for b in batches]) for k in batches[0]}).loss
            loss.backward()
            total = loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return model.state_dict(), losses, schedule


def _update_deviation(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], init: Dict[str, torch.Tensor]) -> float:
    """|| (a - init) - (b - init) || / || b - init || over all parameters: how far the training
    updates differ, relative to their size."""
    num = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in b)
    den = sum(((b[k].float() - init[k].float()) ** 2).sum() for k in b)
    return (num / den).sqrt().item()


def check_parity_dtype_and_comm(results: Dict, dtype: torch.dtype, opt_name: str) -> None:
    """FSDP2 vs single-process LisaOptimizer on the global batch over 4 switches; while at it, every
    reduce-scatter is fp32 and only the root + active layers issue one.

    fp32 weights: must agree to fp32 rounding. bf16 weights: on a random-init model with random
    data Adam amplifies bf16 rounding (tiny gradients, sign-like first steps), so the reference's
    own result moves by tens of percent when only its batching changes; the FSDP2 run must stay
    within twice that, which a wrong gradient, schedule or master would not.
    """
    tag = f"{opt_name}_{str(dtype).replace('torch.', '')}"
    lisa = LisaConfig(activated_layers=GAMMA, interval_steps=2, seed=0)
    steps, lr, wd = 8, (1e-2 if opt_name == "adamw" else 0.5), 0.01
    rank, world = dist.get_rank(), dist.get_world_size()
    cls, kw = OPTIMIZERS[opt_name]
    runner = FSDPRunner(build_model(dtype=dtype), lisa, lr=lr, weight_decay=wd, max_grad_norm=0.0,
                        optimizer_cls=cls, **kw)
    root_numel = sum(p.numel() for _, p in runner.optimizer.split.always)
    layer_numel = sum(p.numel() for _, p in runner.optimizer.split.per_layer[0])
    losses, schedule, per_step = [], [], []
    for step in range(steps):
        active = runner.active_layers
        with count_collectives() as comm:
            losses.append(runner.train_step(rank_batches(step, rank)))
        dtypes = comm.dtypes("reduce_scatter")
        assert dtypes == ["float32"], f"step {step}: reduce-scatter dtypes {dtypes}, expected fp32 only"
        sizes = sorted(comm.sizes("reduce_scatter"))  # bytes of the unsharded fp32 gradient buffer
        expected = sorted([4 * root_numel] * MICRO + [4 * layer_numel] * (GAMMA * MICRO))
        # Frozen layers send nothing: one reduce-scatter per micro-batch for the root and each active layer.
        assert sizes == expected, f"step {step}: reduce-scatter sizes {sizes}, expected {expected} (active {active})"
        per_step.append({"step": step, "active": list(active), **comm.summary()["other"]})
        schedule.append(list(active))
        for i, layer in enumerate(runner.model.model.layers):
            want = torch.float32 if i in runner.active_layers else None
            assert unit_reduce_dtype(layer) == want, (i, unit_reduce_dtype(layer), runner.active_layers)
    switches = runner.switch_index
    assert switches >= 3, switches
    got = full_state(runner.model)
    runner.close()

    # Two references, one per rank in parallel: rank 0 on the global batch, rank 1 accumulating
    # the same examples over micro-batches (to measure how much the reference moves by itself).
    ref = _reference(lisa, dtype, steps, lr, wd, world, opt_name, micro=rank == 1)
    refs = [None] * world if rank == 0 else None
    dist.gather_object(ref if rank < 2 else None, refs, dst=0)
    if rank == 0:
        (ref, ref_losses, ref_schedule), (micro, micro_losses, _) = refs[0], refs[1]
        init = {k: v.clone() for k, v in build_model(dtype=dtype).state_dict().items()}
        assert ref_schedule == schedule, (ref_schedule, schedule)
        deviation = _update_deviation(got, ref, init)
        own = _update_deviation(micro, ref, init)
        bound = 2 * own + 1e-5
        loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
        results[f"parity_{tag}"] = {
            "steps": steps, "switches": switches, "schedule": schedule, "update_deviation": deviation,
            "reference_own_deviation": own, "bound": bound, "max_abs_loss_diff": loss_diff,
            "reference_own_max_abs_loss_diff": max(abs(a - b) for a, b in zip(micro_losses, ref_losses)),
            "losses": losses, "ref_losses": ref_losses}
        log(f"parity {tag}: update deviation from the reference {deviation:.3g} (reference vs itself "
            f"re-batched {own:.3g}), max loss diff {loss_diff:.3g}, {switches} switches")
        assert deviation < bound, (deviation, bound)
    results[f"comm_per_step_{tag}"] = per_step
    dist.barrier()


def check_rows(results: Dict) -> None:
    """embedding_update="rows" on FSDPRunner (lisa-train's fsdp2 path), fp32 and SGD so rounding is
    all that may differ: every rank assigns the same slots, and the deltas merged into the weights
    equal LisaOptimizer's on the same examples (the merged weights are compared: the slot order is
    the reference's too, but that is not what a user sees)."""
    from lisa_dist import vocab_rows
    lisa = LisaConfig(activated_layers=GAMMA, interval_steps=2, seed=0, embedding_update="rows", embedding_rows=512)
    steps, lr, wd = 6, 0.5, 0.01
    rank, world = dist.get_rank(), dist.get_world_size()
    runner = FSDPRunner(build_model(dtype=torch.float32), lisa, lr=lr, weight_decay=wd, max_grad_norm=0.0,
                        optimizer_cls=torch.optim.SGD, momentum=0.9)
    losses = [runner.train_step(rank_batches(step, rank)) for step in range(steps)]
    rows = vocab_rows.find(runner.model).rows
    every = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(every, rows)
    skeleton = build_model(dtype=torch.float32)
    got = vocab_rows.merged_state_dict(skeleton, full_state(runner.model))
    runner.close()
    # The reference forwards micro-batch m of every rank together, as the ranks do (a token gets a slot,
    # and so its head row a gradient, from the first forward that feeds it on any rank).
    model = build_model(dtype=torch.float32)
    opt = LisaOptimizer(model, lisa, torch.optim.SGD, lr=lr, weight_decay=wd, momentum=0.9)
    ref_losses = []
    for step in range(steps):
        total = 0.0
        for m in range(MICRO):
            batches = [micro_batch(step, r, m) for r in range(world)]
            loss = model(**{k: torch.cat([b[k] for b in batches]) for k in batches[0]}).loss / MICRO
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        ref_losses.append(total)
    ref = model.state_dict()
    ref = vocab_rows.merged_state_dict(skeleton, ref)
    init = {k: v.clone() for k, v in skeleton.state_dict().items()}
    deviation = _update_deviation(got, ref, init)
    embed = "model.embed_tokens.weight"
    results["rows"] = {"ranks_agree_on_slots": all(torch.equal(r, rows) for r in every),
                       "slots_used": int((rows >= 0).sum()), "update_deviation": deviation,
                       "embedding_rows_moved": int((got[embed] != init[embed]).any(dim=1).sum()),
                       "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                       "losses": losses, "ref_losses": ref_losses}
    log(f"rows: update deviation from the reference {deviation:.3g}, {results['rows']['slots_used']} slots")


def check_dtype_fixup_needed(results: Dict) -> None:
    """Without the fix-up, on torch 2.13 a layer activated after the first forward reduce-scatters
    in bf16: this is what check_parity_dtype_and_comm would catch if the fix-up were removed. torch
    2.14 derives a frozen unit's reduce dtype from its frozen parameters, so there it stays fp32.
    The fix-up is switched off by replacing refresh_mp_dtypes where FSDPLisaOptimizer calls it."""
    from lisa_dist.backends.fsdp import optimizer as fsdp_optimizer
    lazy_init_loses_reduce_dtype = not frozen_units_keep_reduce_dtype()
    lisa = LisaConfig(activated_layers=GAMMA, interval_steps=1, seed=0)
    refresh_mp_dtypes = fsdp_optimizer.refresh_mp_dtypes
    fsdp_optimizer.refresh_mp_dtypes = lambda model: None
    try:
        runner = FSDPRunner(build_model(), lisa, lr=1e-3, max_grad_norm=0.0)
        first = set(runner.active_layers)
        seen = {}
        for step in range(3):
            active = set(runner.active_layers)
            with count_collectives() as comm:
                runner.train_step(rank_batches(step, dist.get_rank()))
            seen[step] = comm.dtypes("reduce_scatter")
            if step > 0 and active - first:
                if lazy_init_loses_reduce_dtype:
                    assert "bfloat16" in seen[step], (step, active, first, seen)
                else:
                    assert seen[step] == ["float32"], (step, active, first, seen)
        runner.close()
    finally:
        fsdp_optimizer.refresh_mp_dtypes = refresh_mp_dtypes
    results["without_fixup_reduce_dtypes"] = seen
    log(f"without the fix-up, reduce-scatter dtypes per step: {seen}")


def check_memory_flat(results: Dict) -> None:
    """Master + moments on this rank = 12 bytes x this rank's shard of the active set, nothing for
    deactivated layers, flat over 100 switches (K=1)."""
    lisa = LisaConfig(activated_layers=GAMMA, interval_steps=1, seed=3)
    runner = FSDPRunner(build_model(), lisa, lr=1e-3, max_grad_norm=0.0)
    opt = runner.optimizer
    split = opt.split
    world = dist.get_world_size()
    counts = count_params(split)
    floor = model_state_floor("fsdp2", counts.total, counts.gamma_active(GAMMA), world)
    in_step: List[int] = []
    model_state: List[int] = []

    def measure(*_):  # runs after the inner AdamW step, before the switch: the fullest moment
        b = opt.state_bytes()
        in_step.append(b["master"] + b["optimizer_state"])
        active = split.always_params + split.layer_params(opt.active_layers)
        # bf16 params (2 bytes) -> fp32 master + 2 fp32 moments = 12 bytes per element of this
        # rank's shard, plus AdamW's 4-byte scalar step counter per parameter tensor
        expected = 12 * local_bytes(active) // 2 + 4 * len(active)
        assert in_step[-1] == expected, (in_step[-1], expected)
        if not model_state:  # weights + gradients + masters + moments, for the dry run's prediction
            params = list(runner.model.parameters())
            model_state.append(local_bytes(params) + local_bytes([p.grad for p in params if p.grad is not None])
                               + in_step[-1])
        if opt.optimizer_steps in (9, switches - 1):
            live[opt.optimizer_steps] = live_tensor_bytes()

    live: Dict[int, int] = {}
    switches = 100
    opt._inner.register_step_post_hook(measure)
    for step in range(switches):
        runner.train_step([micro_batch(step, dist.get_rank(), 0)])
        trained = set(opt._masters)
        allowed = set(split.always_params + split.layer_params(opt.active_layers))
        assert trained <= allowed, "a master exists for a deactivated layer"
        for i, layer in enumerate(split.per_layer):
            for name, p in layer:
                assert p.requires_grad == (i in opt.active_layers), (name, opt.active_layers)
                assert p.grad is None, name
    assert runner.switch_index == switches, runner.switch_index
    assert len(set(in_step)) == 1, sorted(set(in_step))
    # Everything alive at the fullest moment of step 10 and step 100 (weights, gradients, masters,
    # moments, FSDP buffers, caches): the same bytes, so nothing accumulates across switches.
    assert live[9] == live[switches - 1], live
    sd = runner.optimizer_state_bytes()
    per_rank_floor = floor["master"] + floor["optimizer_state"]
    step_counters = 4 * (len(split.always) + len(split.per_layer[0]) * GAMMA)
    results["memory"] = {"switches": switches, "in_step_master_plus_state_bytes": in_step[0],
                         "floor_master_plus_state_bytes": per_rank_floor, "adamw_step_counter_bytes": step_counters,
                         "full_finetune_master_plus_state_bytes": runner.full_finetune_state_bytes(),
                         "after_switch_bytes": sd, "live_tensor_bytes_step10": live[9],
                         "live_tensor_bytes_step100": live[switches - 1]}
    predicted = dry_run_prediction(runner.model, lisa, "fsdp2", world)
    results["memory"].update(in_step_model_state_bytes=model_state[0], dry_run=predicted,
                             in_step_over_dry_run=model_state[0] / predicted["lisa"]["total"])
    # even shards: exactly the floor, apart from the step counters
    assert in_step[0] - step_counters == per_rank_floor, (in_step[0], step_counters, per_rank_floor)
    runner.close()
    log(f"memory: master+state {in_step[0]} B/rank = floor {per_rank_floor:.0f} over {switches} switches; "
        f"live tensors {live}")


def check_offload_and_checkpointing(results: Dict) -> None:
    """cpu_offload + activation checkpointing train to the same weights as the plain runner."""
    lisa = LisaConfig(activated_layers=GAMMA, interval_steps=2, seed=1)
    finals, mlp_calls = [], []
    for kw in ({}, {"cpu_offload": True, "activation_checkpointing": True}):
        runner = FSDPRunner(build_model(), lisa, lr=1e-2, max_grad_norm=1.0, **kw)
        # Count layer 0's MLP forwards: checkpointing recomputes them in backward. (Forward hooks
        # do not fire during the recompute, so wrap the method instead.)
        calls = []
        mlp = runner.model.model.layers[0].mlp
        forward = mlp.forward
        mlp.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
        for step in range(3):
            runner.train_step(rank_batches(step, dist.get_rank()))
        finals.append(full_state(runner.model))
        mlp_calls.append(len(calls))
        runner.close()
    worst = max((finals[0][k].float() - finals[1][k].float()).abs().max().item() for k in finals[0])
    results["offload_and_checkpointing_max_abs_diff"] = worst
    results["layer0_mlp_forwards_plain_vs_checkpointed"] = mlp_calls
    log(f"cpu_offload + activation checkpointing vs plain: max |diff| {worst}, layer-0 MLP forwards {mlp_calls}")
    assert worst == 0.0, worst
    assert mlp_calls == [3 * MICRO, 2 * 3 * MICRO], mlp_calls


def check_disagreement_raises(results: Dict) -> None:
    """Ranks configured with different seeds get a clear error at the first switch, not a hang."""
    lisa = LisaConfig(activated_layers=GAMMA, interval_steps=2, seed=dist.get_rank())
    try:
        FSDPRunner(build_model(), lisa, lr=1e-3)
    except RuntimeError as e:
        assert "ranks disagree" in str(e) and "rank 0" in str(e) and "rank 1" in str(e), e
        results["disagreement_error"] = str(e)
        log(f"different seeds per rank: {e}")
    else:
        raise AssertionError("ranks with different LISA seeds were not detected")
    gc.collect()


def _digest(state: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].float().numpy().tobytes())
    return h.hexdigest()


def _masters_digest(runner: FSDPRunner) -> str:
    h = hashlib.sha256()
    opt = runner.optimizer
    for p, m in opt._masters.items():
        h.update(opt._names[p].encode())
        h.update(m.to_local().numpy().tobytes())
        for key, v in sorted(opt.state.get(m, {}).items()):
            h.update(key.encode())
            h.update((v.to_local() if hasattr(v, "to_local") else v).numpy().tobytes())
    return h.hexdigest()


def resume_runner(policy: str, seed: int = 0, **lisa_fields) -> FSDPRunner:
    lisa = LisaConfig(activated_layers=GAMMA, interval_steps=2, seed=5, state_policy=policy, **lisa_fields)
    return FSDPRunner(build_model(seed), lisa, lr=1e-2, weight_decay=0.01, warmup_steps=3, max_grad_norm=1.0)


def check_resume_first_half(results: Dict, workdir: Path) -> None:
    for policy in ("reset", "offload"):
        straight = resume_runner(policy)
        losses = [straight.train_step(rank_batches(s, dist.get_rank())) for s in range(RESUME_STEPS)]
        expect = {"losses": losses[RESUME_AT:], "weights": _digest(full_state(straight.model)),
                  "masters": _masters_digest(straight), "active": list(straight.active_layers),
                  "switch_index": straight.switch_index, "schedule_log": straight.schedule_log}
        straight.close()
        first = resume_runner(policy)
        for s in range(RESUME_AT):
            first.train_step(rank_batches(s, dist.get_rank()))
        first.save_checkpoint(workdir / f"ckpt-{policy}", RESUME_AT)
        first.close()
        if policy == "reset":
            export = workdir / "export"
            straight2 = resume_runner(policy)
            straight2.train_step(rank_batches(0, dist.get_rank()))
            weights = full_state(straight2.model)
            straight2.save_pretrained(export)
            straight2.close()
            if dist.get_rank() == 0:
                reloaded = LlamaForCausalLM.from_pretrained(export).state_dict()
                assert set(reloaded) == set(weights), set(reloaded) ^ set(weights)
                for k, v in weights.items():
                    assert torch.equal(reloaded[k], v), k
                log("save_pretrained: safetensors reload matches the gathered weights exactly")
        results[f"resume_expect_{policy}"] = expect
    results["exported"] = True


def check_resume_second_half(results: Dict, workdir: Path, expected: Dict) -> None:
    for policy in ("reset", "offload"):
        want = expected[f"resume_expect_{policy}"]
        runner = resume_runner(policy, seed=123)  # different init: everything must come from the checkpoint
        step = runner.load_checkpoint(workdir / f"ckpt-{policy}")
        assert step == RESUME_AT, step
        losses = [runner.train_step(rank_batches(s, dist.get_rank())) for s in range(step, RESUME_STEPS)]
        got = {"losses": losses, "weights": _digest(full_state(runner.model)), "masters": _masters_digest(runner),
               "active": list(runner.active_layers), "switch_index": runner.switch_index}
        runner.close()
        for key in got:
            assert got[key] == want[key], f"{policy}: {key} differs after resume: {got[key]} vs {want[key]}"
        results[f"resume_{policy}"] = "bit-identical"
        log(f"resume ({policy}): {RESUME_AT} + {RESUME_STEPS - RESUME_AT} steps bit-identical to {RESUME_STEPS} "
            f"straight (weights, masters, moments, losses, schedule)")
    # Frozen embeddings would change the optimizer's layout: refused with the fields and the fix named.
    runner = resume_runner("reset", train_embeddings=False)
    try:
        runner.load_checkpoint(workdir / "ckpt-reset")
    except ValueError as e:
        results["resume_mismatch_error"] = str(e)
    else:
        raise AssertionError("a checkpoint written with train_embeddings=True loaded into train_embeddings=False")
    runner.close()


# --- importance-weighted sampling ------------------------------------------------------------------

def _same_on_all_ranks(value) -> bool:
    everyone: List = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, json.dumps(value, sort_keys=True))
    return all(e == everyone[0] for e in everyone)


def _planted(seed: int = 0):
    """fp32 model with outsized weights on large-input channels: 8 in layer 4, 2 in layer 1."""
    model = build_model(seed, torch.float32)
    with torch.no_grad():
        model.model.layers[4].self_attn.q_proj.weight[:, :8] *= 40.0
        model.model.layers[1].self_attn.q_proj.weight[:, :2] *= 40.0
    return model


def _importance_reference(model, lisa: LisaConfig, steps: int, world: int, calibration=None):
    opt = LisaOptimizer(model, lisa, torch.optim.AdamW, lr=1e-2, calibration=calibration)
    schedule, states = [list(opt.active_layers)], []
    for step in range(steps):
        batches = [b for r in range(world) for b in rank_batches(step, r)]
        model(**{k: torch.cat([b[k] for b in batches]) for k in batches[0]}).loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.append(list(opt.active_layers))
        states.append(opt.importance.state_dict())
    return opt, schedule, states


def check_importance(results: Dict, workdir: Path) -> None:
    """sampling="gradient": statistics from the DTensor gradient shards are bit-identical on every
    rank, match the single-process reference, and a mid-interval checkpoint resumes bit-identical.
    sampling="outlier": ratios from the row shards are identical on every rank, equal the
    single-process ones over every rank's calibration batches and rank the planted layer first."""
    from lisa_dist.outlier import outlier_ratios
    rank, world = dist.get_rank(), dist.get_world_size()
    lisa = LisaConfig(activated_layers=GAMMA, interval_steps=2, seed=5, sampling="gradient")
    steps, save_at = 9, 5

    def runner(seed: int = 0, config: LisaConfig = lisa, **kw) -> FSDPRunner:
        model = _planted(seed) if config.sampling == "outlier" else build_model(seed, torch.float32)
        return FSDPRunner(model, config, lr=1e-2, max_grad_norm=0.0, **kw)

    ref, ref_schedule, ref_states = _importance_reference(build_model(0, torch.float32), lisa, steps, world)
    straight = runner()
    per_step, schedule = [], [list(straight.active_layers)]
    for s in range(steps):
        straight.train_step(rank_batches(s, rank))
        per_step.append(straight.optimizer.importance.state_dict())
        schedule.append(list(straight.active_layers))
        if s + 1 == save_at:
            straight.save_checkpoint(workdir / "ckpt-gradient", save_at)
    state, digest = per_step[-1], _digest(full_state(straight.model))
    straight.close()
    assert _same_on_all_ranks(per_step), "gradient statistics differ between ranks"
    # Step 0 starts from the same weights: the sharded statistics equal the full ones to fp32
    # rounding. Later, AdamW at lr 1e-2 amplifies that rounding in the weights themselves (as in
    # the parity check above), so the moving averages agree less tightly.
    first = {i: (v, ref_states[0]["pending"][i]) for i, v in per_step[0]["pending"].items()}
    rel0 = max(abs(a - b) / abs(b) for a, b in first.values())
    assert per_step[0]["pending"].keys() == ref_states[0]["pending"].keys() and rel0 < 1e-5, first
    rel = max(abs(a - b) / abs(b) for a, b in zip(state["ema"], ref.importance.state_dict()["ema"]))
    assert rel < 1e-2, (state["ema"], ref.importance.state_dict()["ema"])
    assert schedule == ref_schedule, (schedule, ref_schedule)
    resumed = runner(seed=123)
    assert resumed.load_checkpoint(workdir / "ckpt-gradient") == save_at
    assert resumed.optimizer.importance.state_dict() == per_step[save_at - 1]
    for s in range(save_at, steps):
        resumed.train_step(rank_batches(s, rank))
    assert _digest(full_state(resumed.model)) == digest, "gradient mode: weights differ after resume"
    assert resumed.optimizer.importance.state_dict() == state
    resumed.close()
    results["importance_gradient"] = {"ema": state["ema"], "ema_max_rel_diff": rel, "step0_max_rel_diff": rel0,
                                      "schedule": schedule,
                                      "ranks_identical": True, "resume_bit_identical": True,
                                      "pending_steps_at_save": per_step[save_at - 1]["pending_steps"]}
    log(f"importance gradient: statistics identical on {world} ranks, {rel0:.1e} (step 0) and {rel:.1e} (end) "
        "from the reference, "
        "resume bit-identical")

    olisa = LisaConfig(activated_layers=GAMMA, interval_steps=2, seed=5, sampling="outlier", outlier_threshold=8.0)
    calib_all = [micro_batch(900 + i, r, 0) for r in range(world) for i in range(2)]
    plain = _planted()
    want = outlier_ratios(list(plain.model.layers), lambda b: plain(input_ids=b["input_ids"]), calib_all, 8.0)
    numel = sum(m.weight.numel() for m in plain.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    oref, oref_schedule, _ = _importance_reference(_planted(), olisa, 4, world, calibration=calib_all)
    calibration = lambda r, w: [micro_batch(900 + i, r, 0) for i in range(2)]  # noqa: E731
    orun = runner(config=olisa, calibration=calibration)
    got = list(orun.optimizer.importance.outlier_ratios)
    oschedule = [list(orun.active_layers)]
    for s in range(4):
        orun.train_step(rank_batches(s, rank))
        oschedule.append(list(orun.active_layers))
        if s + 1 == 3:  # K=2: inside interval 1
            orun.save_checkpoint(workdir / "ckpt-outlier", 3)
    odigest = _digest(full_state(orun.model))
    orun.close()
    # another init measures other ratios; the checkpoint's must win
    oresumed = runner(seed=123, config=olisa, calibration=calibration)
    fresh = list(oresumed.optimizer.importance.outlier_ratios)
    assert oresumed.load_checkpoint(workdir / "ckpt-outlier") == 3
    assert list(oresumed.optimizer.importance.outlier_ratios) == got
    oresumed.train_step(rank_batches(3, rank))
    assert fresh != got and _digest(full_state(oresumed.model)) == odigest, "outlier mode: resume differs"
    oresumed.close()
    assert _same_on_all_ranks(got), got
    assert max(range(LAYERS), key=lambda i: got[i]) == 4, got
    assert max(abs(a - b) for a, b in zip(got, want)) <= 2.0 / numel, (got, want)
    assert oschedule == oref_schedule, (oschedule, oref_schedule)
    results["importance_outlier"] = {"ratios": got, "reference_ratios": want, "ranks_identical": True,
                                     "schedule": oschedule, "resume_bit_identical": True}
    log("importance outlier: ratios identical on every rank, planted layer first, resume bit-identical")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("main", "resume"), required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--only", nargs="*", help="run just these main-phase checks (debugging)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.workdir.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results: Dict = {}
    if args.phase == "main":
        # SGD is linear in the gradient, so its fp32 run pins the sharded gradient path to rounding
        # error; AdamW in bf16 is the production configuration.
        runs = (("sgd", "fp32", torch.float32), ("sgd", "bf16", torch.bfloat16), ("adamw", "bf16", torch.bfloat16))
        checks = {f"parity_{o}_{d}": functools.partial(check_parity_dtype_and_comm, dtype=dt, opt_name=o)
                  for o, d, dt in runs}
        checks.update({"rows": check_rows, "fixup": check_dtype_fixup_needed, "memory": check_memory_flat,
                       "offload": check_offload_and_checkpointing, "disagree": check_disagreement_raises,
                       "resume": lambda r: check_resume_first_half(r, args.workdir),
                       "importance": lambda r: check_importance(r, args.workdir)})
        for name, check in checks.items():
            if not args.only or name in args.only:
                start = time.perf_counter()
                check(results)
                log(f"{name}: {time.perf_counter() - start:.1f} s")
    else:
        expected = json.loads((args.workdir / f"main.rank{rank}.json").read_text())
        check_resume_second_half(results, args.workdir, expected)
    (args.workdir / f"{args.phase}.rank{rank}.json").write_text(json.dumps(results, indent=1, default=str))
    gc.collect()
    dist.barrier()
    log(f"{args.phase}: all checks passed")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
