"""DeepSpeed ZeRO-3 LISA hook checks, run by tests/distributed/test_deepspeed_zero3.py under the real launcher:

    deepspeed --num_gpus 2 tests/scripts/zero3_checks.py --out /tmp/x [--only a,b]

Each scenario builds a fresh tiny Llama and engine, trains and records what it measured; a failed
check raises, so the rank exits non-zero. Every rank writes OUT/rank<r>.json with {scenario: result}.
Data, model and the single-process reference come from zero12_checks.py (same directory).

Under ZeRO-3 a parameter's `.data` is empty between steps (numel 0): weights are compared through
their partitions (`ds_tensor`) or gathered with deepspeed.zero.GatheredParameters.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import importance_checks  # noqa: E402
from deepspeed_internals import zero3_module_hook_count  # noqa: E402
from plan_prediction import dry_run_prediction  # noqa: E402
from zero12_checks import ADAMW, BETAS, EPS, LR, WD, build_model, ds_config, rank_micro_batches, reference  # noqa: E402

import lisa_dist.backends.deepspeed as lds  # noqa: E402
from ds_common import allow_fp16_on_cpu, close, compare, naive_toggling_bytes, run_scenarios, settled_live_bytes  # noqa: E402
from lisa_dist.backends.deepspeed import _compat  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.memory import count_params, model_state_floor  # noqa: E402

torch.set_num_threads(1)


def ds3_config(bf16: bool, gas: int = 1, optimizer: Optional[dict] = None, scheduler: Optional[dict] = None,
               clip: float = 0.0, offload_optimizer=False, offload_param=False, **zero) -> dict:
    # 0: every parameter is partitioned (the tiny model's are all below DeepSpeed's 1e5 default,
    # which would keep them whole on every rank and hide what partitioning does).
    z = {"stage3_prefetch_bucket_size": 50_000, "stage3_param_persistence_threshold": 0, **zero}
    if offload_optimizer:
        z["offload_optimizer"] = offload_optimizer if isinstance(offload_optimizer, dict) else \
            {"device": "cpu", "pin_memory": False}
    if offload_param:
        z["offload_param"] = offload_param if isinstance(offload_param, dict) else \
            {"device": "cpu", "pin_memory": False}
    return ds_config(3, bf16, gas, optimizer, scheduler, clip, **z)


def gathered_weights(model) -> torch.Tensor:
    """Every parameter, whole, flattened in float64 (collective)."""
    import deepspeed
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().double().flatten() for p in params])


def plain_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def shards(split, layer: int) -> List[torch.Tensor]:
    return [p.ds_tensor.detach().clone() for _, p in split.per_layer[layer]]


def ownership(engine, offload_id: int, hooks: int) -> Dict:
    """What this rank's stage-3 optimizer owns right after a switch, against the LISA active set."""
    lisa, zero, basic = engine.lisa, engine.optimizer, engine.basic_optimizer
    split = lisa.split
    expected = [p for p in split.always_params + split.layer_params(lisa.active_layers)]
    owned = _compat.zero3_trainable_params(zero)
    partitions = _compat.zero3_fp32_partitions(zero)
    share = sum(p.ds_tensor.numel() for p in expected)  # this rank's partitions, padding included
    offload = _compat.zero3_parameter_offload(zero)
    expected_ids = {id(p) for p in expected}
    stale = [p for p in lisa.managed if id(p) not in expected_ids and (p.requires_grad or p.grad is not None)]
    state_on_partitions = all(any(k is t for t in partitions) for k in basic.state.keys())
    state_shapes = all(v.shape == k.shape for k, st in basic.state.items() for v in st.values()
                       if torch.is_tensor(v) and v.dim() > 0)
    out = {"switch_index": lisa.switch_index, "active": list(lisa.active_layers),
           "owned_ok": {id(p) for p in owned} == {id(p) for p in expected},
           "requires_grad_ok": all(p.requires_grad == (id(p) in expected_ids) for p in lisa.managed),
           "deactivated_clean": not stale, "state_on_partitions": state_on_partitions, "state_shapes_ok": state_shapes,
           "partition_numel": sum(t.numel() for t in partitions), "active_share_numel": share,
           "sub_groups": len(partitions),
           "psi_active": sum(p.ds_numel for p in expected),
           "all_partitioned": all(p.numel() == 0 for p in engine.module.parameters()),
           "offload_same": id(offload) == offload_id, "module_hooks": zero3_module_hook_count(offload),
           "hooks_same": zero3_module_hook_count(offload) == hooks,
           "linked": all(getattr(p, "_z3_optimizer", None) is zero for p in engine.module.parameters())}
    if lisa.host is not None:
        out["host_layers"] = sorted(k for k in lisa.host)
    for key in ("owned_ok", "requires_grad_ok", "deactivated_clean", "state_on_partitions", "state_shapes_ok",
                "all_partitioned", "offload_same", "hooks_same", "linked"):
        assert out[key], f"ownership check {key} failed: {out}"
    assert out["partition_numel"] == share, f"fp32 partition is not this rank's share of the active set: {out}"
    return out


def train(engine, steps: int, gas: int, on_switch: Optional[Callable] = None, check_frozen: bool = True,
          torch_backward: bool = False) -> Dict:
    """forward, engine.backward, engine.step per micro-batch; frozen layers' shards must not move."""
    lisa = engine.lisa
    losses, frozen_checks, lrs = [], 0, []
    for step in range(steps):
        before = set(lisa.active_layers)
        snapshot = {i: shards(lisa.split, i) for i in range(lisa.split.num_layers) if i not in before} \
            if check_frozen else {}
        for ids in rank_micro_batches(step, gas):
            loss = engine(input_ids=ids, labels=ids).loss
            if torch_backward:
                loss.backward()
            else:
                engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        for i, snap in snapshot.items():
            now = shards(lisa.split, i)
            assert all(torch.equal(a, b) for a, b in zip(now, snap)), \
                f"frozen layer {i} shard changed during step {step} (active {sorted(before)})"
            frozen_checks += 1
        group_lrs = [g["lr"] for g in engine.basic_optimizer.param_groups]
        assert all(lr == group_lrs[0] for lr in group_lrs), f"param groups disagree on lr: {group_lrs}"
        lrs.append(group_lrs[0])
        if lisa.optimizer_steps % lisa.config.interval_steps == 0 and on_switch is not None:
            on_switch()
    assert all(math.isfinite(x) for x in losses), losses
    return {"losses": losses, "frozen_layer_checks": frozen_checks, "lrs": lrs,
            "schedule": [(e["step"], e["switch_index"], e["active_layers"]) for e in lisa.schedule_log],
            "switch_seconds": [e["seconds"] for e in lisa.schedule_log[1:]]}


def make_optimizer(kind: str, model):
    """(optimizer object or None, optimizer config or None) for a parity run."""
    if kind == "object":
        return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD), None
    params = dict(ADAMW, torch_adam=True) if kind == "config_torch" else ADAMW
    return None, {"type": "AdamW", "params": params}


# --- scenarios --------------------------------------------------------------------------------------

BASELINES: Dict[str, torch.Tensor] = {}
"""Gathered weights of earlier scenarios of this launch, for the offload runs to compare with."""


def parity(bf16: bool, policy: str, gas: int, interval: int, steps: int, optimizer: str,
           checkpointing: Optional[bool] = None, keep_as: Optional[str] = None, baseline: Optional[str] = None,
           **cfg_kw) -> Dict:
    """Same seed, data and schedule as LisaOptimizer; ownership after every switch; frozen shards.
    `keep_as` stores the final weights under that name, `baseline` compares with stored ones."""
    model = build_model()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    start = copy.deepcopy(model)
    lisa = LisaConfig(activated_layers=2, interval_steps=interval, seed=5, state_policy=policy)
    ref = reference(model, lisa, steps, gas, bf16)
    opt, opt_cfg = make_optimizer(optimizer, model)
    engine, _, _, _ = lds.initialize(model=model, optimizer=opt, config=ds3_config(bf16, gas, opt_cfg, **cfg_kw),
                                     lisa=lisa)
    offload = _compat.zero3_parameter_offload(engine.optimizer)
    hooks = zero3_module_hook_count(offload)
    owned: List[Dict] = [ownership(engine, id(offload), hooks)]
    result = train(engine, steps, gas, on_switch=lambda: owned.append(ownership(engine, id(offload), hooks)))
    if bf16:
        start = start.to(torch.bfloat16)
    got = gathered_weights(engine.module)
    result.update(compare(got, plain_weights(ref), plain_weights(start)))
    mine = got.clone()
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    result["ranks_identical"] = all(torch.equal(g, everyone[0]) for g in everyone)
    result["ownership"] = owned
    result["module_hooks"] = hooks
    reactivated, seen_off = set(), set()
    for a, b in zip(owned, owned[1:]):
        seen_off |= set(a["active"]) - set(b["active"])
        reactivated |= set(b["active"]) & seen_off
    result["reactivated_layers"] = sorted(reactivated)
    if baseline is not None:
        want = BASELINES[baseline]
        result["vs_baseline_max_abs_diff"] = (got - want).abs().max().item()
        result["vs_baseline_mean_abs_diff"] = (got - want).abs().mean().item()
    if keep_as is not None:
        BASELINES[keep_as] = got
    if cfg_kw.get("offload_param"):
        from deepspeed.accelerator import get_accelerator
        shards = [p.ds_tensor for p in engine.module.parameters()]
        result["partitions_on_host"] = all(t.device.type == "cpu" for t in shards)
        # detach(): a fresh tensor over the same memory; the shard object itself may carry a stale
        # ds_pinned flag from the buffer it first lived in, which the native backend trusts.
        result["pinned_partitions"] = [sum(bool(get_accelerator().is_pinned(t.detach())) for t in shards), len(shards)]
    result["optimizer_type"] = type(engine.basic_optimizer).__name__
    close(engine)
    return result


def leak(switches: int) -> Dict:
    """Live tensor bytes flat over many switches (K=1, offload policy); module hooks and the
    parameter offload object survive every rebuild; a switch costs less than a step."""
    model = build_model(layers=4, hidden=32)
    lisa = LisaConfig(activated_layers=1, interval_steps=1, seed=3, state_policy="offload")
    cfg = ds3_config(False, optimizer={"type": "AdamW", "params": ADAMW})
    engine, _, _, _ = lds.initialize(model=model, config=cfg, lisa=lisa)
    offload = _compat.zero3_parameter_offload(engine.optimizer)
    hooks = zero3_module_hook_count(offload)
    ids = rank_micro_batches(0, 1)[0]
    samples, step_seconds = {}, []
    probes = {10, switches // 2, switches}
    for step in range(1, switches + 1):
        t0 = time.perf_counter()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        # the step wrapper switched after the optimizer step: take the switch out of the step time
        step_seconds.append(time.perf_counter() - t0 - engine.lisa.schedule_log[-1]["seconds"])
        if step in probes:
            b = lds.model_state_bytes(engine)
            live = settled_live_bytes()
            # Groups new to an interval have no Adam state until they step, and the host copies
            # grow as layers are visited: take those out, the rest must not move.
            samples[step] = {"live": live, "optimizer_state": b["optimizer_state"], "host": b["host_offload"],
                             "unexplained": live - b["optimizer_state"] - b["host_offload"]}
    assert engine.lisa.switch_index == switches
    now = _compat.zero3_parameter_offload(engine.optimizer)
    assert now is offload and zero3_module_hook_count(now) == hooks, "parameter offload or its hooks replaced"
    rest = [s["unexplained"] for s in samples.values()]
    assert max(rest) == min(rest), f"live tensor bytes grow across switches: {samples}"
    switch_seconds = sorted(e["seconds"] for e in engine.lisa.schedule_log[1:])
    close(engine)
    return {"samples": samples, "module_hooks": hooks, "offload_same": True,
            "switch_seconds_median": switch_seconds[len(switch_seconds) // 2],
            "step_seconds_median": sorted(step_seconds)[len(step_seconds) // 2]}


def memory() -> Dict:
    """Model-state bytes vs the docs/design.md#memory-floors floor (2Psi/N + 14Psi_a/N), and the naive
    toggling baseline."""
    n = dist.get_world_size()
    layers, gamma = 8, 2
    cfg = ds3_config(True, optimizer={"type": "AdamW", "params": ADAMW})
    lisa = LisaConfig(activated_layers=gamma, interval_steps=3, seed=2)
    model = build_model(layers=layers)
    engine, _, _, _ = lds.initialize(model=model, config=cfg, lisa=lisa)
    train(engine, 1, 1, check_frozen=False)  # every group now owns its Adam state
    ids = rank_micro_batches(1, 1)[0]
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    in_step = lds.model_state_bytes(engine)  # gradients reduced, not yet applied: the fullest moment
    engine.step()
    assert engine.lisa.switch_index == 0
    between = lds.model_state_bytes(engine)
    counts = count_params(engine.lisa.split)
    psi_a = counts.active(engine.lisa.active_layers)
    active = engine.lisa.split.always_params + engine.lisa.split.layer_params(engine.lisa.active_layers)
    share = sum(p.ds_tensor.numel() for p in active)  # this rank's elements of the active set, padding included
    floor = model_state_floor("zero3", counts.total, psi_a, n, weight_bytes=2)
    full_floor = model_state_floor("zero3", counts.total, counts.total, n, weight_bytes=2)
    close(engine)
    predicted = dry_run_prediction(model, lisa, "deepspeed", n, ds_config=cfg)

    naive_bytes = naive_toggling_bytes(build_model(layers=layers), cfg, lisa, gamma, rank_micro_batches)

    def opt_bytes(b):
        return b["fp32_master"] + b["optimizer_state"]

    result = {"psi": counts.total, "psi_active": psi_a, "active_share_numel": share, "floor": floor,
              "full_floor": full_floor, "lisa_in_step": in_step, "lisa": between, "naive": naive_bytes,
              "lisa_over_floor": between["model_state"] / floor["total"],
              "lisa_in_step_over_floor": in_step["model_state"] / floor["total"],
              # fp32 master 4 + Adam 8 bytes per element of this rank's share: exact, padding included
              "optimizer_bytes_per_share_element": opt_bytes(between) / share,
              "weights_over_floor": between["weights"] / floor["weights"],
              "naive_optimizer_over_full":
                  opt_bytes(naive_bytes) / (full_floor["master"] + full_floor["optimizer_state"]),
              "lisa_optimizer_over_naive": opt_bytes(between) / opt_bytes(naive_bytes),
              "dry_run": predicted, "in_step_over_dry_run": in_step["model_state"] / predicted["lisa"]["total"]}
    assert result["optimizer_bytes_per_share_element"] == 12, result
    assert result["lisa_in_step_over_floor"] <= 1.1 and result["lisa_over_floor"] <= 1.1, result
    return result


def runner_check(out_dir: Path) -> Dict:
    """DeepSpeedRunner on ZeRO-3: parity with 2 micro-batches, gathered save_pretrained, reload."""
    from transformers import LlamaForCausalLM

    from lisa_dist.backends.deepspeed.runner import DeepSpeedRunner
    model = build_model()
    start = copy.deepcopy(model)
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=7)
    gas, steps = 2, 5
    ref = reference(model, lisa, steps, gas, bf16=False)
    cfg = ds3_config(False, 1, optimizer={"type": "AdamW", "params": dict(ADAMW, torch_adam=True)})
    runner = DeepSpeedRunner(model, lisa, cfg)
    losses = []
    for step in range(steps):
        micro = [{"input_ids": ids, "labels": ids} for ids in rank_micro_batches(step, gas)]
        losses.append(runner.train_step(micro))
    got = gathered_weights(runner.engine.module)
    result = compare(got, plain_weights(ref), plain_weights(start))
    result.update({"losses": losses, "switch_index": runner.switch_index,
                   "optimizer_state_bytes": runner.optimizer_state_bytes(),
                   "full_finetune_state_bytes": runner.full_finetune_state_bytes()})
    save_dir = out_dir / "saved"
    runner.save_pretrained(save_dir, None)
    if runner.rank == 0:
        result["saved_files"] = sorted(p.name for p in save_dir.iterdir())
        reloaded = LlamaForCausalLM.from_pretrained(save_dir)
        result["reload_max_diff"] = (plain_weights(reloaded) - got).abs().max().item()
    BASELINES["saved"] = got
    dist.barrier()
    runner.close()
    return result


def loading(out_dir: Path) -> Dict:
    """lisa-train's ZeRO-3 loading (BACKENDS["deepspeed"].load): a preset built under zero.Init and
    then given the single-process init, and the runner's saved model re-saved as several safetensors
    files and loaded partitioned with from_pretrained; both partitioned on arrival, with the weights
    of the single-process build / of from_pretrained."""
    import transformers

    from lisa_dist.recipe.modeling import build_model_and_tokenizer
    from lisa_dist.recipe.run_config import RunConfig
    from lisa_dist.recipe.train import BACKENDS
    cfg_path, sharded = out_dir / "zero3.json", out_dir / "saved_sharded"
    tokenizer = str(Path(__file__).resolve().parents[2] / "lisa_dist" / "recipe" / "assets" / "tokenizer")
    if dist.get_rank() == 0:
        cfg_path.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                                        "train_micro_batch_size_per_gpu": 1}))
        transformers.AutoModelForCausalLM.from_pretrained(out_dir / "saved").save_pretrained(
            sharded, max_shard_size="100KB")
    dist.barrier()
    result = {}
    for name, model_arg in (("preset", "tiny-llama"), ("pretrained", str(sharded))):
        run = RunConfig(model=model_arg, backend="deepspeed", deepspeed=str(cfg_path), batch_size=1, dtype="fp32",
                        warmup_steps=0, steps=1, lisa=LisaConfig(seed=5),
                        tokenizer=None if name == "preset" else tokenizer)
        # Whole reference first: while a partitioned model lives, transformers builds under zero.Init.
        whole = (build_model_and_tokenizer(model_arg, torch.float32, seed=run.lisa.seed)[0] if name == "preset" else
                 transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32))
        assert not any(hasattr(p, "ds_id") for p in whole.parameters())
        model, _ = BACKENDS["deepspeed"].load(run, torch.float32)
        params = list(model.parameters())
        r = {"all_zero3": all(hasattr(p, "ds_id") for p in params),
             "local_numel": sum(p.numel() for p in params),
             "shard_numel": sum(p.ds_tensor.numel() for p in params), "total_numel": sum(p.ds_numel for p in params)}
        weights = gathered_weights(model)
        if name == "pretrained":
            r["files"] = len(list(sharded.glob("*.safetensors")))
            r["vs_saved_max_abs_diff"] = (weights - BASELINES["saved"]).abs().max().item()
        else:
            everyone = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
            dist.all_gather(everyone, weights)
            r["ranks_identical"] = all(torch.equal(w, everyone[0]) for w in everyone)
            r["std"] = weights.std().item()
        r["equal_to_whole_build"] = torch.equal(weights, plain_weights(whole))
        result[name] = r
        del model, params, whole
        gc.collect()
    return result


def lr_schedule(kind: str) -> Dict:
    """The LR schedule runs on across optimizer rebuilds: a DeepSpeed config scheduler (bound to the
    torch optimizer the hook re-fills) or a torch scheduler over the caller's optimizer."""
    model = build_model()
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=11)
    opt, sched, sched_cfg = None, None, None
    if kind == "config":
        sched_cfg = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                         "warmup_num_steps": 3, "total_num_steps": 8}}
        opt_cfg = {"type": "AdamW", "params": ADAMW}
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        opt_cfg = None
    cfg = ds3_config(True, optimizer=opt_cfg, scheduler=sched_cfg, clip=1.0)
    engine, _, _, returned = lds.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg, lisa=lisa)
    steps = 6
    result = train(engine, steps, 1)
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    if kind == "config":
        from deepspeed.runtime.lr_schedules import WarmupDecayLR
        replica = WarmupDecayLR(dummy, **sched_cfg["params"])
    else:
        replica = torch.optim.lr_scheduler.LambdaLR(dummy, lambda s: 1.0 / (1 + s))
    dummy.step()
    expected = []
    for _ in range(steps):
        replica.step()
        expected.append(dummy.param_groups[0]["lr"])
    assert returned is engine.lr_scheduler
    assert all(abs(a - b) <= 1e-12 for a, b in zip(result["lrs"], expected)), (result["lrs"], expected)
    switches = len(engine.lisa.schedule_log) - 1
    close(engine)
    return {"lrs": result["lrs"], "expected_lrs": expected, "switches": switches}


def fp16_loss_scale() -> Dict:
    """zero12_checks.fp16_loss_scale under ZeRO-3: the scaler survives the stage-3 rebuild."""
    from ds_common import overflow_schedule
    model = build_model()
    start = copy.deepcopy(model).half()
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=4, state_policy="offload")
    cfg = ds3_config(False, optimizer={"type": "AdamW", "params": ADAMW})
    cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 10, "loss_scale_window": 3,
                   "hysteresis": 2, "min_loss_scale": 1}
    engine, _, _, _ = lds.initialize(model=model, config=cfg, lisa=lisa)
    offload = _compat.zero3_parameter_offload(engine.optimizer)
    hooks = zero3_module_hook_count(offload)
    return overflow_schedule(engine, rank_micro_batches, start, close, gathered_weights, None,
                             lambda: ownership(engine, id(offload), hooks))


def repeated_gathers(times: int) -> Dict:
    """GatheredParameters over every parameter, `times` times between two steps: each gather must
    return the same weights. DeepSpeed before 0.19 waited on the last of its per-param all-gathers
    only, so on gloo some came back as garbage (_compat.install_zero3_gather_fix)."""
    model = build_model()
    cfg = ds3_config(False, optimizer={"type": "AdamW", "params": ADAMW})
    engine, _, _, _ = lds.initialize(model=model, config=cfg,
                                     lisa=LisaConfig(activated_layers=2, interval_steps=2, seed=5))
    train(engine, 1, 1, check_frozen=False)
    first = gathered_weights(engine.module)
    differing = sum(not torch.equal(gathered_weights(engine.module), first) for _ in range(times))
    assert differing == 0 and torch.isfinite(first).all(), f"{differing} of {times} gathers differ"
    close(engine)
    return {"gathers": times, "differing": differing}


def scenarios(out_dir: Path) -> Dict[str, Callable[[], Dict]]:
    offload_run = dict(bf16=False, policy="reset", gas=1, interval=2, steps=6, optimizer="config")
    return {
        "parity_fp32": lambda: parity(False, "reset", 1, 2, 8, "object"),
        # sub_group_size below one layer's share: each group spans several DeepSpeed sub-groups
        "parity_fp32_offload_policy": lambda: parity(False, "offload", 1, 1, 8, "config_torch", sub_group_size=5000),
        "parity_bf16_gas2": lambda: parity(True, "reset", 2, 2, 8, "config"),
        "ckpt_reentrant_true": lambda: parity(False, "reset", 1, 1, 4, "object", checkpointing=True),
        # The offload runs against the same run without offload (DeepSpeed's own AdamW; CPU Adam
        # under offload_optimizer).
        "offload_none": lambda: parity(**offload_run, keep_as="no_offload"),
        "offload_optimizer": lambda: parity(**offload_run, baseline="no_offload", offload_optimizer=True),
        "offload_param": lambda: parity(**offload_run, baseline="no_offload", offload_param=True),
        "offload_both": lambda: parity(**offload_run, baseline="no_offload", offload_optimizer=True,
                                       offload_param=True),
        "repeated_gathers": lambda: repeated_gathers(200),
        "lr_config_scheduler": lambda: lr_schedule("config"),
        "lr_torch_scheduler": lambda: lr_schedule("torch"),
        "fp16_loss_scale": fp16_loss_scale,
        # torch's AdamW on the host, pinned: the rebuild hands DeepSpeed a non-CPU-Adam optimizer
        "parity_fp32_optcpu_torchadam_pin": lambda: parity(False, "reset", 1, 2, 8, "config_torch",
                                                           offload_optimizer={"device": "cpu", "pin_memory": True}),
        "leak": lambda: leak(100),
        "memory": memory,
        "runner": lambda: runner_check(out_dir),
        "loading": lambda: loading(out_dir),
        # importance-weighted sampling from the partitions (tests/scripts/importance_checks.py)
        "importance_gradient": lambda: importance_checks.gradient(3, out_dir, importance_config),
        "importance_outlier": lambda: importance_checks.outlier(3, out_dir, importance_config),
    }


def old_release_gaps(table: Dict[str, Callable[[], Dict]]) -> Dict[str, Callable[[], Dict]]:
    """Before 0.19 DeepSpeed's ZeRO-3 fails non-reentrant activation checkpointing when some params
    are frozen (which LISA always has), LISA or not: that scenario runs on 0.19+ only."""
    import deepspeed
    from packaging.version import Version
    if Version(Version(deepspeed.__version__).base_version) >= Version("0.19"):
        table["ckpt_reentrant_false"] = lambda: parity(False, "reset", 1, 1, 4, "object", checkpointing=False)
        table["offload_param_native_pins"] = native_pins
    return table


def native_pins() -> Dict:
    """offload_param with pinned shards under DeepSpeed 0.19's native pinning backend (mlock'ed host
    memory it tracks itself; Tensor.is_pinned() does not see it, and its unpin frees the memory), the
    one way to pin host memory on a CPU: after every switch every shard must still be pinned and the
    weights those of the run without offload."""
    os.environ["DS_PIN_MEMORY_BACKEND"] = "native"
    try:
        return parity(bf16=False, policy="reset", gas=1, interval=2, steps=6, optimizer="config",
                      baseline="no_offload", offload_param={"device": "cpu", "pin_memory": True})
    finally:
        del os.environ["DS_PIN_MEMORY_BACKEND"]


def importance_config() -> dict:
    # sub_group_size below one layer's share: a layer's gradient spans several DeepSpeed sub-groups
    return ds3_config(False, optimizer={"type": "AdamW", "params": dict(ADAMW, torch_adam=True)},
                      sub_group_size=5000)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    import deepspeed
    allow_fp16_on_cpu()
    deepspeed.init_distributed(dist_backend="gloo")
    table = old_release_gaps(scenarios(args.out))
    names = [n for n in args.only.split(",") if n] or list(table)
    run_scenarios(table, names, args.out, "zero3_checks")

if __name__ == "__main__":
    main()
