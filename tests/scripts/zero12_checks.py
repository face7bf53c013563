"""DeepSpeed ZeRO-1/2 LISA hook checks, run by tests/distributed/test_deepspeed_zero12.py under the real launcher:

    deepspeed --num_gpus 2 tests/scripts/zero12_checks.py --stage 2 --out /tmp/x

Each scenario builds a fresh tiny Llama and engine, trains a few steps and records what it measured;
any failed check raises, so the rank exits non-zero. Every rank writes OUT/rank<r>.json with
{scenario: result}; pytest asserts on those. `--only a,b` runs a subset (the disagreement test runs
`--only skew`, where rank 1 uses another seed, and expects the launch to fail).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from plan_prediction import dry_run_prediction  # noqa: E402

import builders  # noqa: E402
import lisa_dist.backends.deepspeed as lds  # noqa: E402
from builders import tiny_llama  # noqa: E402
from ds_common import allow_fp16_on_cpu, close, compare, naive_toggling_bytes, run_scenarios, settled_live_bytes  # noqa: E402
from lisa_dist.backends.deepspeed import _compat  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.memory import count_params, model_state_floor  # noqa: E402
from lisa_dist.optim import LisaOptimizer  # noqa: E402

torch.set_num_threads(1)

VOCAB, SEQ, MB = 256, 16, 2  # vocabulary, tokens per sequence, sequences per micro-batch
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
ADAMW = {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD}


# --- building blocks ------------------------------------------------------------------------------

build_model = functools.partial(tiny_llama, vocab=VOCAB)


def ds_config(stage: int, bf16: bool, gas: int = 1, optimizer: Optional[dict] = None, scheduler: Optional[dict] = None,
              clip: float = 0.0, **zero) -> dict:
    return builders.ds_config(stage, MB, gas=gas, train_batch=MB * gas * dist.get_world_size(), clip=clip, bf16=bf16,
                              optimizer=optimizer, scheduler=scheduler, **zero)


def global_batch(step: int, gas: int) -> torch.Tensor:
    """Every sequence of optimizer step `step` on all ranks; any rank can rebuild it."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (dist.get_world_size() * gas * MB, SEQ), generator=g)


def rank_micro_batches(step: int, gas: int) -> List[torch.Tensor]:
    rows, n, r = global_batch(step, gas), dist.get_world_size(), dist.get_rank()
    return [rows[(j * n + r) * MB:(j * n + r + 1) * MB] for j in range(gas)]


def layer_snapshot(split) -> List[List[torch.Tensor]]:
    return [[p.detach().clone() for _, p in layer] for layer in split.per_layer]


def flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def ranks_identical(model) -> bool:
    mine = flat_weights(model)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def ownership(engine) -> Dict:
    """What this rank's ZeRO optimizer owns right after a switch, against the LISA active set."""
    lisa, zero, basic = engine.lisa, engine.optimizer, engine.basic_optimizer
    split, n = lisa.split, dist.get_world_size()
    expected = {id(p) for p in split.always_params + split.layer_params(lisa.active_layers)}
    owned = {id(p) for group in _compat.bit16_groups(zero) for p in group}
    partitions = _compat.fp32_partitions(zero)
    psi_a = sum(p.numel() for p in lisa.managed if id(p) in expected)
    stale = [p for p in lisa.managed if id(p) not in expected
             and (p.requires_grad or p.grad is not None or getattr(p, "_hp_mapping", None) is not None)]
    state_on_partitions = all(any(k is t for t in partitions) for k in basic.state.keys())
    state_shapes = all(v.shape == k.shape for k, st in basic.state.items() for v in st.values()
                       if torch.is_tensor(v) and v.dim() > 0)
    out = {"switch_index": lisa.switch_index, "active": list(lisa.active_layers),
           "keys_ok": lisa.group_keys == (["always"] if split.always else []) + sorted(lisa.active_layers),
           "owned_ok": owned == expected,
           "requires_grad_ok": all(p.requires_grad == (id(p) in expected) for p in lisa.managed),
           "deactivated_clean": not stale, "state_on_partitions": state_on_partitions,
           "state_shapes_ok": state_shapes, "partition_numel": sum(t.numel() for t in partitions),
           "share_ratio": sum(t.numel() for t in partitions) * n / psi_a, "psi_active": psi_a}
    if lisa.host is not None:
        out["host_layers"] = sorted(k for k in lisa.host)
    if getattr(zero, "cpu_offload", False):
        # offload_optimizer: the master partitions and the moments live on the host
        host = [t for t in partitions] + [v for st in basic.state.values() for v in st.values()
                                           if torch.is_tensor(v) and v.dim() > 0]
        out["on_host"] = all(t.device.type == "cpu" for t in host)
        assert out["on_host"], f"offload_optimizer: a master or moment is not on the host: {out}"
    for key in ("keys_ok", "owned_ok", "requires_grad_ok", "deactivated_clean", "state_on_partitions",
                "state_shapes_ok"):
        assert out[key], f"ownership check {key} failed: {out}"
    assert 1.0 <= out["share_ratio"] <= 1.01, f"partition is not this rank's share of the active set: {out}"
    return out


def train(engine, model, steps: int, gas: int, on_switch: Optional[Callable] = None,
          check_frozen: bool = True, torch_backward: bool = False) -> Dict:
    """Drive the engine the way DeepSpeed users do: forward, engine.backward, engine.step per micro-batch."""
    lisa = engine.lisa
    losses, frozen_checks, lrs = [], 0, []
    for step in range(steps):
        before = set(lisa.active_layers)
        snapshot = layer_snapshot(lisa.split) if check_frozen else None
        for ids in rank_micro_batches(step, gas):
            loss = engine(input_ids=ids, labels=ids).loss
            if torch_backward:  # DeepSpeed's post-backward hook must be re-registered on each rebuild
                loss.backward()
            else:
                engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        if check_frozen:
            for i, layer in enumerate(lisa.split.per_layer):
                if i in before:
                    continue
                assert all(torch.equal(p, q) for (_, p), q in zip(layer, snapshot[i])), \
                    f"frozen layer {i} changed during step {step} (active {sorted(before)})"
                frozen_checks += 1
        group_lrs = [g["lr"] for g in engine.basic_optimizer.param_groups]
        assert all(lr == group_lrs[0] for lr in group_lrs), f"param groups disagree on lr: {group_lrs}"
        lrs.append(group_lrs[0])
        if lisa.optimizer_steps % lisa.config.interval_steps == 0 and on_switch is not None:
            on_switch()
        elif lisa.optimizer_steps % lisa.config.interval_steps != 0:
            # Mid-interval every group has stepped, so each owns its optimizer state.
            assert len(engine.basic_optimizer.state) == len(lisa.group_keys), "a group has no optimizer state"
    assert all(math.isfinite(x) for x in losses), losses
    return {"losses": losses, "frozen_layer_checks": frozen_checks, "lrs": lrs,
            "schedule": [(e["step"], e["switch_index"], e["active_layers"]) for e in lisa.schedule_log],
            "switch_seconds": [e["seconds"] for e in lisa.schedule_log[1:]]}


def reference(model, lisa: LisaConfig, steps: int, gas: int, bf16: bool) -> LlamaForCausalLM:
    """Single-process LisaOptimizer on the full global batch: what every backend must match."""
    ref = copy.deepcopy(model)
    if bf16:
        ref = ref.to(torch.bfloat16)
    opt = LisaOptimizer(ref, lisa, torch.optim.AdamW, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for step in range(steps):
        ids = global_batch(step, gas)
        ref(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return ref


# --- scenarios --------------------------------------------------------------------------------------

def parity(stage: int, bf16: bool, policy: str, gas: int, interval: int, steps: int, optimizer: str,
           offload: Optional[dict] = None) -> Dict:
    """Same seed, data and schedule as LisaOptimizer; ownership after every switch; frozen layers.
    `offload`: zero_optimization.offload_optimizer (fp32 master, moments and the optimizer step on
    the host; DeepSpeedCPUAdam unless the config asks for torch_adam)."""
    zero = {"offload_optimizer": offload} if offload else {}
    model = build_model()
    start = copy.deepcopy(model)
    lisa = LisaConfig(activated_layers=2, interval_steps=interval, seed=5, state_policy=policy)
    ref = reference(model, lisa, steps, gas, bf16)
    if optimizer == "object":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        cfg = ds_config(stage, bf16, gas, **zero)
    else:  # DeepSpeed config; "torch_adam" keeps torch's AdamW arithmetic for a tight fp32 comparison
        params = dict(ADAMW, torch_adam=True) if optimizer == "config_torch" else ADAMW
        opt, cfg = None, ds_config(stage, bf16, gas, optimizer={"type": "AdamW", "params": params}, **zero)
    engine, _, _, _ = lds.initialize(model=model, optimizer=opt, config=cfg, lisa=lisa)
    if offload:
        expect = "DeepSpeedCPUAdam" if optimizer == "config" else "AdamW"
        assert type(engine.basic_optimizer).__name__ == expect, type(engine.basic_optimizer)
    owned: List[Dict] = [ownership(engine)]
    result = train(engine, model, steps, gas, on_switch=lambda: owned.append(ownership(engine)))
    if bf16:
        start = start.to(torch.bfloat16)
    result.update(compare(flat_weights(engine.module), flat_weights(ref), flat_weights(start)))
    result["ownership"] = owned
    result["ranks_identical"] = ranks_identical(engine.module)
    reactivated = set()
    seen_off = set()
    for a, b in zip(owned, owned[1:]):
        seen_off |= set(a["active"]) - set(b["active"])
        reactivated |= set(b["active"]) & seen_off
    result["reactivated_layers"] = sorted(reactivated)
    result["basic_optimizer"] = type(engine.basic_optimizer).__name__
    result["master_devices"] = sorted({t.device.type for t in _compat.fp32_partitions(engine.optimizer)})
    close(engine)
    return result


def matrix(stage: int, name: str, bf16: bool, gas: int, clip: float, checkpointing: bool, optimizer: str,
           scheduler: str, torch_backward: bool = False, **zero) -> Dict:
    """A configuration trains, switches, keeps ranks identical and carries the LR schedule."""
    model = build_model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    start = copy.deepcopy(model)
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=11)
    opt_cfg, opt, sched_cfg, sched = None, None, None, None
    warmup = {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 5, "warmup_type": "linear"}
    if optimizer == "config":
        opt_cfg = {"type": "AdamW", "params": ADAMW}
    elif optimizer == "object":
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    elif optimizer == "callable":
        def opt(groups):
            return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    if scheduler == "WarmupLR":
        sched_cfg = {"type": "WarmupLR", "params": warmup}
    elif scheduler == "WarmupDecayLR":
        sched_cfg = {"type": "WarmupDecayLR", "params": dict(warmup, total_num_steps=12)}
    elif scheduler == "torch_object":
        assert opt is not None and not callable(opt) or isinstance(opt, torch.optim.Optimizer)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    cfg = ds_config(stage, bf16, gas, optimizer=opt_cfg, scheduler=sched_cfg, clip=clip, **zero)
    engine, _, _, returned_sched = lds.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg,
                                                  lisa=lisa)
    steps = 6
    # a plain loss.backward() drives DeepSpeed 0.18+ only; older releases run engine.backward here
    torch_backward = torch_backward and _compat.supports_torch_style_backward(engine)
    result = train(engine, model, steps, gas, on_switch=lambda: ownership(engine), torch_backward=torch_backward)
    result["torch_backward"] = torch_backward
    # The same schedule stepped alone: the LR must survive every optimizer rebuild.
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    if scheduler in ("WarmupLR", "WarmupDecayLR"):
        from deepspeed.runtime import lr_schedules
        cls = getattr(lr_schedules, scheduler)
        replica = cls(dummy, **sched_cfg["params"])
    elif scheduler == "torch_object":
        replica = torch.optim.lr_scheduler.LambdaLR(dummy, lambda s: 1.0 / (1 + s))
    else:
        replica = None
    dummy.step()  # no gradient, no update; keeps torch from warning about the call order below
    expected = []
    for _ in range(steps):
        if replica is not None:
            replica.step()
        expected.append(dummy.param_groups[0]["lr"])
    assert all(abs(a - b) <= 1e-12 * max(1.0, abs(b)) for a, b in zip(result["lrs"], expected)), \
        f"{name}: LR schedule not carried across switches: got {result['lrs']} expected {expected}"
    assert returned_sched is engine.lr_scheduler
    if bf16:
        start = start.to(torch.bfloat16)
    update = (flat_weights(engine.module) - flat_weights(start)).abs().max().item()
    assert update > 0, f"{name}: nothing trained"
    result.update({"name": name, "expected_lrs": expected, "ranks_identical": ranks_identical(engine.module),
                   "max_update": update, "switches": len(engine.lisa.schedule_log) - 1})
    assert result["ranks_identical"], f"{name}: ranks diverged"
    close(engine)
    return result


def memory(stage: int, offload: Optional[dict] = None) -> Dict:
    """Model-state bytes vs the docs/design.md#memory-floors floor, and the naive requires_grad-toggling baseline.

    With `offload` (offload_optimizer to the host) DeepSpeed reduces the bf16 gradients into fp32
    gradient partitions on the host, so the floor's gradient term is 4 Psi_a / N bytes instead of
    the ZeRO-2 2 Psi_a / N (ZeRO-1: 2 Psi_a + ...); the naive baseline is not re-measured."""
    n = dist.get_world_size()
    layers, gamma = 8, 2
    zero = {"offload_optimizer": offload} if offload else {}
    cfg = ds_config(stage, True, optimizer={"type": "AdamW", "params": ADAMW}, **zero)
    lisa = LisaConfig(activated_layers=gamma, interval_steps=3, seed=2)

    model = build_model(layers=layers)
    engine, _, _, _ = lds.initialize(model=model, config=cfg, lisa=lisa)
    train(engine, model, 1, 1, check_frozen=False)  # every group now owns its Adam state
    ids = rank_micro_batches(1, 1)[0]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    in_step = lds.model_state_bytes(engine)  # gradients reduced, not yet applied: the peak
    engine.step()
    assert engine.lisa.switch_index == 0  # K=3: still the first interval
    lisa_bytes = lds.model_state_bytes(engine)
    counts = count_params(engine.lisa.split)
    psi_a = counts.active(engine.lisa.active_layers)
    floor = model_state_floor(f"zero{stage}", counts.total, psi_a, n, weight_bytes=2)
    full_floor = model_state_floor(f"zero{stage}", counts.total, counts.total, n, weight_bytes=2)
    close(engine)
    predicted = dry_run_prediction(model, lisa, "deepspeed", n, ds_config=cfg)
    dry_run = {"dry_run": predicted, "in_step_over_dry_run": in_step["model_state"] / predicted["lisa"]["total"]}
    if offload:
        grads = 4 * psi_a / n + (2 * psi_a if stage == 1 else 0)  # host fp32 partition (+ ZeRO-1's bf16 grads)
        floor = dict(floor, grads=grads, total=floor["total"] - floor["grads"] + grads)
        result = {"psi": counts.total, "psi_active": psi_a, "floor": floor, "lisa": lisa_bytes,
                  "lisa_in_step": in_step, "lisa_over_floor": lisa_bytes["model_state"] / floor["total"],
                  "lisa_in_step_over_floor": in_step["model_state"] / floor["total"],
                  "master_over_active_share": lisa_bytes["fp32_master"] / (4 * psi_a / n), **dry_run}
        assert result["lisa_over_floor"] <= 1.1 and result["lisa_in_step_over_floor"] <= 1.1, result
        assert 1.0 <= result["master_over_active_share"] <= 1.01, result
        return result

    # Naive: DeepSpeed over every parameter, then requires_grad toggled the LMFlow/axolotl way.
    naive_bytes = naive_toggling_bytes(build_model(layers=layers), cfg, lisa, gamma, rank_micro_batches)

    opt_bytes = lambda b: b["fp32_master"] + b["optimizer_state"]  # noqa: E731
    result = {"psi": counts.total, "psi_active": psi_a, "floor": floor, "full_floor": full_floor,
              "lisa": lisa_bytes, "lisa_in_step": in_step, "naive": naive_bytes,
              "lisa_over_floor": lisa_bytes["model_state"] / floor["total"],
              "lisa_in_step_over_floor": in_step["model_state"] / floor["total"],
              "naive_optimizer_over_full":
                  opt_bytes(naive_bytes) / (full_floor["master"] + full_floor["optimizer_state"]),
              "lisa_optimizer_over_naive": opt_bytes(lisa_bytes) / opt_bytes(naive_bytes), **dry_run}
    assert result["lisa_over_floor"] <= 1.1 and result["lisa_in_step_over_floor"] <= 1.1, result
    assert result["naive_optimizer_over_full"] >= 0.99, result
    return result


def leak(stage: int, policy: str, switches: int) -> Dict:
    """Live tensor bytes stay flat over many switches (K=1)."""
    model = build_model(layers=4, hidden=32)
    lisa = LisaConfig(activated_layers=1, interval_steps=1, seed=3, state_policy=policy)
    cfg = ds_config(stage, True, optimizer={"type": "AdamW", "params": ADAMW})
    engine, _, _, _ = lds.initialize(model=model, config=cfg, lisa=lisa)
    ids = rank_micro_batches(0, 1)[0]
    samples = {}
    probes = {10, switches}  # each probe walks every Python object: ~1-3 s here
    for step in range(1, switches + 1):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        if step in probes:
            b = lds.model_state_bytes(engine)
            live = settled_live_bytes()
            # Right after a switch only groups that stayed active hold Adam state, and host copies
            # depend on what has been visited: take those out, the rest must not move.
            samples[step] = {"live": live, "optimizer_state": b["optimizer_state"], "host": b["host_offload"],
                             "unexplained": live - b["optimizer_state"] - b["host_offload"]}
    assert engine.lisa.switch_index == switches
    rest = [s["unexplained"] for s in samples.values()]
    assert max(rest) == min(rest), f"live tensor bytes grow across switches: {samples}"
    seconds = sorted(e["seconds"] for e in engine.lisa.schedule_log[1:])
    close(engine)
    return {"samples": samples, "switch_seconds_median": seconds[len(seconds) // 2]}


def fp16_loss_scale(stage: int, offload: Optional[dict] = None) -> Dict:
    """fp16 with dynamic loss scaling: overflows forced right before a switch, right after one
    (on one rank only: ZeRO agrees on overflow across ranks) and mid-run. After every step the
    engine's scaler must equal a replica of the initial scaler driven by the same overflows, i.e.
    the scale, iteration counter, last overflow and hysteresis went through every rebuild."""
    from ds_common import overflow_schedule
    model = build_model()
    start = copy.deepcopy(model).half()
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=4, state_policy="offload")
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 10, "loss_scale_window": 3,
            "hysteresis": 2, "min_loss_scale": 1}
    zero = {"offload_optimizer": offload} if offload else {}
    cfg = ds_config(stage, False, optimizer={"type": "AdamW", "params": ADAMW}, **zero)
    cfg["fp16"] = fp16
    engine, _, _, _ = lds.initialize(model=model, config=cfg, lisa=lisa)
    return overflow_schedule(engine, rank_micro_batches, start, close, flat_weights, ranks_identical,
                             lambda: ownership(engine))


def train_runner(model, lisa: LisaConfig, stage: int, steps: int, gas: int):
    """A DeepSpeedRunner (lisa-train's) over `model`, trained `steps` steps of `gas` micro-batches of
    this rank's share, with a config saying 1 micro-batch; returns it and its losses."""
    from lisa_dist.backends.deepspeed.runner import DeepSpeedRunner
    cfg = ds_config(stage, False, 1, optimizer={"type": "AdamW", "params": dict(ADAMW, torch_adam=True)})
    runner = DeepSpeedRunner(model, lisa, cfg)
    losses = []
    for step in range(steps):
        micro = [{"input_ids": ids, "labels": ids} for ids in rank_micro_batches(step, gas)]
        losses.append(runner.train_step(micro))
    return runner, losses


def runner_check(stage: int, out_dir: Path) -> Dict:
    """DeepSpeedRunner: the recipe's interface; 2 micro-batches with a config saying 1."""
    model = build_model()
    start = copy.deepcopy(model)
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=7)
    gas, steps = 2, 5
    ref = reference(model, lisa, steps, gas, bf16=False)
    runner, losses = train_runner(model, lisa, stage, steps, gas)
    result = compare(flat_weights(runner.engine.module), flat_weights(ref), flat_weights(start))
    result.update({"losses": losses, "rank": runner.rank, "world_size": runner.world_size,
                   "active_layers": list(runner.active_layers), "switch_index": runner.switch_index,
                   "schedule_log": runner.schedule_log, "optimizer_state_bytes": runner.optimizer_state_bytes(),
                   "full_finetune_state_bytes": runner.full_finetune_state_bytes()})
    save_dir = out_dir / "saved"
    runner.save_pretrained(save_dir, None)
    result["saved_files"] = sorted(p.name for p in save_dir.iterdir()) if save_dir.exists() else []
    if runner.rank == 0:
        reloaded = LlamaForCausalLM.from_pretrained(save_dir)
        result["reload_max_diff"] = (flat_weights(reloaded) - flat_weights(runner.engine.module)).abs().max().item()
    runner.close()
    return result


def runner_rows(stage: int, out_dir: Path) -> Dict:
    """DeepSpeedRunner (lisa-train's) with embedding_update="rows" on untied embeddings and head: the
    ranks feed different tokens but must assign the same slots in the same order, and train what
    LisaOptimizer trains on the global batch; the saved model has the deltas merged."""
    from lisa_dist import vocab_rows
    # 150 slots; 2 ranks feed about 180 distinct tokens of 256: the table fills up mid-run, so the
    # cut-off must agree too
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=7, embedding_update="rows", embedding_rows=150)
    model = build_model()
    start = copy.deepcopy(model)
    vocab_rows.attach(start, lisa)  # zero deltas: the start of what the engine's module holds
    gas, steps = 1, 5
    ref = copy.deepcopy(model)
    opt = LisaOptimizer(ref, lisa, torch.optim.AdamW, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    ref_losses = []
    for step in range(steps):
        ids = global_batch(step, gas)
        loss = ref(input_ids=ids, labels=ids).loss
        loss.backward()
        ref_losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    runner, losses = train_runner(model, lisa, stage, steps, gas)
    module = runner.engine.module
    rows = vocab_rows.find(module).rows
    every = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(every, rows)
    ref_rows = vocab_rows.find(ref).rows
    result = compare(flat_weights(module), flat_weights(ref), flat_weights(start))
    result.update({"losses": losses, "ref_losses": ref_losses, "slots_used": int((rows >= 0).sum()),
                   "ranks_agree_on_slots": all(torch.equal(r, rows) for r in every),
                   "slots_equal_reference": torch.equal(rows, ref_rows),
                   "deltas": sorted(n for n, _ in vocab_rows.find(module).named_parameters())})
    save_dir = out_dir / "saved_rows"
    runner.save_pretrained(save_dir, None)
    if runner.rank == 0:
        reloaded = LlamaForCausalLM.from_pretrained(save_dir)
        merged = vocab_rows.merged_state_dict(ref, ref.state_dict())
        result["reload_vs_reference_merged_max_diff"] = max(
            (v - merged[k]).abs().max().item() for k, v in reloaded.state_dict().items())
        ids = global_batch(steps, gas)
        with torch.no_grad():
            result["reload_vs_hooked_logits_max_diff"] = (reloaded(input_ids=ids).logits
                                                          - ref(input_ids=ids).logits).abs().max().item()
    runner.close()
    return result


def loading(stage: int, out_dir: Path) -> Dict:
    """lisa-train's ZeRO-1/2 loading (BACKENDS["deepspeed"].load, then the runner's engine) of a
    checkpoint in several safetensors files: every rank's weights equal from_pretrained's."""
    from lisa_dist.backends.deepspeed.runner import DeepSpeedRunner
    from lisa_dist.recipe.run_config import RunConfig
    from lisa_dist.recipe.train import BACKENDS
    sharded = out_dir / "loading_checkpoint"
    if dist.get_rank() == 0:
        build_model(seed=4).save_pretrained(sharded, max_shard_size="100KB")
    dist.barrier()
    cfg_path = out_dir / f"zero{stage}_loading.json"
    cfg = ds_config(stage, False, optimizer={"type": "AdamW", "params": dict(ADAMW, torch_adam=True)})
    if dist.get_rank() == 0:  # one writer: a rank rewriting the file while another reads it reads it empty
        cfg_path.write_text(json.dumps(cfg))
    dist.barrier()
    tokenizer = str(Path(__file__).resolve().parents[2] / "lisa_dist" / "recipe" / "assets" / "tokenizer")
    run = RunConfig(model=str(sharded), backend="deepspeed", deepspeed=str(cfg_path), dtype="fp32", batch_size=MB,
                    warmup_steps=0, steps=1, tokenizer=tokenizer)
    model, _ = BACKENDS["deepspeed"].load(run, torch.float32)
    whole = LlamaForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    loaded_equal = torch.equal(flat_weights(model), flat_weights(whole))
    runner = DeepSpeedRunner(model, LisaConfig(activated_layers=2, interval_steps=2, seed=0), cfg)
    result = {"files": len(list(sharded.glob("*.safetensors"))), "loaded_equal": loaded_equal,
              "engine_equal": torch.equal(flat_weights(runner.engine.module), flat_weights(whole))}
    runner.close()
    return result


def lisa_train_fp16(stage: int, out_dir: Path) -> Dict:
    """`lisa-train --backend deepspeed --dtype fp16` with the shipped config, a few steps over two
    switches: the recipe's runner gets a DeepSpeed engine in fp16 with the dynamic loss scaler."""
    from lisa_dist.recipe.train import BACKENDS, parse_args
    from lisa_dist.recipe.train import train as lisa_train
    backend = BACKENDS["deepspeed"]
    real_runner = backend.__dict__["runner"]
    seen: Dict = {}

    def recording_runner(run, model, calibration=None):
        runner = real_runner.__func__(run, model, calibration)
        zero = runner.engine.optimizer
        seen.update(fp16_enabled=runner.engine.fp16_enabled(), bf16_enabled=runner.engine.bfloat16_enabled(),
                    weights_dtype=str(next(runner.engine.module.parameters()).dtype),
                    dynamic_loss_scale=bool(zero.dynamic_loss_scale), loss_scaler=type(zero.loss_scaler).__name__)
        return runner

    backend.runner = staticmethod(recording_runner)
    try:
        summary = lisa_train(parse_args([
            "--backend", "deepspeed", "--deepspeed", str(Path(__file__).resolve().parents[2] / "ds_configs" /
                                                         f"zero{stage}.json"),
            "--dtype", "fp16", "--steps", "4", "--interval-steps", "2", "--batch-size", "2", "--max-length", "32",
            "--warmup-steps", "1", "--output-dir", str(out_dir / "fp16_run"), "--no-save", "--no-plots"]))
    finally:
        backend.runner = real_runner
    assert seen["fp16_enabled"] and not seen["bf16_enabled"] and seen["dynamic_loss_scale"], seen
    assert all(math.isfinite(x) for x in summary["losses"]), summary["losses"]
    return {**seen, "losses": summary["losses"], "switches": [e["switch_index"] for e in summary["schedule"]]}


def skew(stage: int) -> Dict:
    """Rank 1 samples with another seed than rank 0: must raise the disagreement error on every rank."""
    model = build_model()
    cfg = ds_config(stage, True, optimizer={"type": "AdamW", "params": ADAMW})
    engine, _, _, _ = lds.initialize(model=model, config=cfg,
                                     lisa=LisaConfig(activated_layers=2, interval_steps=1, seed=dist.get_rank()))
    train(engine, model, 4, 1)
    return {"unexpected": "no disagreement detected"}


def scenarios(stage: int, out_dir: Path) -> Dict[str, Callable[[], Dict]]:
    s = {
        "parity_fp32": lambda: parity(stage, False, "reset", 1, 2, 8, "object"),
        "parity_fp32_offload": lambda: parity(stage, False, "offload", 1, 1, 8, "config_torch"),
        "parity_bf16_gas2": lambda: parity(stage, True, "reset", 2, 2, 8, "config"),
        # offload_optimizer to the host: torch's AdamW with pinned buffers, DeepSpeedCPUAdam without
        "parity_fp32_optcpu_torchadam_pin": lambda: parity(stage, False, "reset", 1, 2, 8, "config_torch",
                                                           offload={"device": "cpu", "pin_memory": True}),
        "parity_fp32_offload_optcpu_cpuadam": lambda: parity(stage, False, "offload", 1, 1, 8, "config",
                                                             offload={"device": "cpu", "pin_memory": False}),
        "fp16_loss_scale": lambda: fp16_loss_scale(stage),
        "memory": lambda: memory(stage),
        "memory_optcpu": lambda: memory(stage, offload={"device": "cpu", "pin_memory": True}),
        "leak": lambda: leak(stage, "reset" if stage == 1 else "offload", 100),
        "runner": lambda: runner_check(stage, out_dir),
        "loading": lambda: loading(stage, out_dir),
        "skew": lambda: skew(stage),
    }
    if stage == 2:  # importance-weighted sampling (tests/scripts/importance_checks.py); ZeRO-3 runs them too
        import importance_checks
        cfg = lambda: ds_config(stage, False, optimizer={"type": "AdamW",  # noqa: E731
                                                         "params": dict(ADAMW, torch_adam=True)})
        s["importance_gradient"] = lambda: importance_checks.gradient(stage, out_dir, cfg)
        s["importance_outlier"] = lambda: importance_checks.outlier(stage, out_dir, cfg)
    # Item 5 of the issue: every configuration once. ZeRO-2 crosses them with overlap_comm and
    # contiguous_gradients on and off.
    variants = [("bf16_gas2_clip_ckpt_warmup", dict(bf16=True, gas=2, clip=1.0, checkpointing=True,
                                                    optimizer="config", scheduler="WarmupLR")),
                ("fp32_object_torchsched", dict(bf16=False, gas=1, clip=0.5, checkpointing=False,
                                                optimizer="object", scheduler="torch_object")),
                ("bf16_callable_decay_torchbackward", dict(bf16=True, gas=1, clip=0.0, checkpointing=False,
                                                           optimizer="callable", scheduler="WarmupDecayLR",
                                                           torch_backward=True))]
    if stage == 2:  # the V100/T4 stack: fp16 with the optimizer on the host (DeepSpeedCPUAdam)
        s["fp16_loss_scale_optcpu"] = lambda: fp16_loss_scale(stage, offload={"device": "cpu"})
        s["lisa_train_fp16"] = lambda: lisa_train_fp16(stage, out_dir)
        s["runner_rows"] = lambda: runner_rows(stage, out_dir)
    if stage == 1:
        for name, kw in variants:
            s[f"matrix_{name}"] = lambda n=name, kw=kw: matrix(stage, n, **kw)
    else:
        variants.append(("bf16_config_warmup", dict(bf16=True, gas=1, clip=0.0, checkpointing=False,
                                                    optimizer="config", scheduler="WarmupLR")))
        combos = [(True, False), (False, False), (True, True), (False, True)]
        for (name, kw), (overlap, contiguous) in zip(variants, combos):
            full = f"{name}_overlap{int(overlap)}_contiguous{int(contiguous)}"
            s[f"matrix_{full}"] = lambda n=full, kw=kw, o=overlap, c=contiguous: matrix(
                stage, n, overlap_comm=o, contiguous_gradients=c, **kw)
    return s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all but skew)")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    import deepspeed
    allow_fp16_on_cpu()
    deepspeed.init_distributed(dist_backend="gloo")
    table = scenarios(args.stage, args.out)
    names = [n for n in args.only.split(",") if n] or [n for n in table if n not in ("skew", "runner")] + ["runner"]
    run_scenarios(table, names, args.out, f"zero12_checks stage {args.stage}")

if __name__ == "__main__":
    main()
