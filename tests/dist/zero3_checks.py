"""DeepSpeed ZeRO-3 LISA hook checks, run by tests/test_deepspeed_zero3.py under the real launcher:

    deepspeed --num_gpus 2 tests/dist/zero3_checks.py --out /tmp/x [--only a,b]

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

import lisa_dist.deepspeed as lds  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.deepspeed import _compat  # noqa: E402
from lisa_dist.memory import count_params, live_tensor_bytes, model_state_floor  # noqa: E402
from zero12_checks import (ADAMW, BETAS, EPS, LR, WD, build_model, global_batch,  # noqa: E402
                           rank_micro_batches, reference)

torch.set_num_threads(1)


def ds3_config(bf16: bool, gas: int = 1, optimizer: Optional[dict] = None, scheduler: Optional[dict] = None,
               clip: float = 0.0, offload_optimizer: bool = False, offload_param: bool = False, **zero) -> dict:
    from zero12_checks import MB
    z = {"stage": 3, "reduce_bucket_size": 50_000, "stage3_prefetch_bucket_size": 50_000,
         # 0: every parameter is partitioned (the tiny model's are all below DeepSpeed's 1e5 default,
         # which would keep them whole on every rank and hide what partitioning does).
         "stage3_param_persistence_threshold": 0, **zero}
    if offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if offload_param:
        z["offload_param"] = {"device": "cpu", "pin_memory": False}
    cfg = {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": gas,
           "train_batch_size": MB * gas * dist.get_world_size(), "steps_per_print": 10 ** 9,
           "gradient_clipping": clip, "bf16": {"enabled": bf16}, "zero_optimization": z}
    if optimizer is not None:
        cfg["optimizer"] = optimizer
    if scheduler is not None:
        cfg["scheduler"] = scheduler
    return cfg


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


def ranks_identical_shards_differ(model) -> bool:
    """Gathered weights agree on every rank (they are the same tensors after a gather: a sanity check
    that every rank took part in the same collectives)."""
    mine = gathered_weights(model)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def ownership(engine, offload_id: int, hooks: int) -> Dict:
    """What this rank's stage-3 optimizer owns right after a switch, against the LISA active set."""
    lisa, zero, basic = engine.lisa, engine.optimizer, engine.basic_optimizer
    split = lisa.split
    expected = [p for p in split.always_params + split.layer_params(lisa.active_layers)]
    owned = _compat.zero3_trainable_params(zero)
    partitions = _compat.zero3_fp32_partitions(zero)
    share = sum(p.ds_tensor.numel() for p in expected)  # this rank's partitions, padding included
    offload = _compat.zero3_parameter_offload(zero)
    stale = [p for p in lisa.managed if id(p) not in {id(q) for q in expected} and (p.requires_grad or p.grad is not None)]
    state_on_partitions = all(any(k is t for t in partitions) for k in basic.state.keys())
    state_shapes = all(v.shape == k.shape for k, st in basic.state.items() for v in st.values()
                       if torch.is_tensor(v) and v.dim() > 0)
    out = {"switch_index": lisa.switch_index, "active": list(lisa.active_layers),
           "owned_ok": {id(p) for p in owned} == {id(p) for p in expected},
           "requires_grad_ok": all(p.requires_grad == (id(p) in {id(q) for q in expected}) for p in lisa.managed),
           "deactivated_clean": not stale, "state_on_partitions": state_on_partitions, "state_shapes_ok": state_shapes,
           "partition_numel": sum(t.numel() for t in partitions), "active_share_numel": share,
           "psi_active": sum(p.ds_numel for p in expected),
           "all_partitioned": all(p.numel() == 0 or getattr(p, "ds_persist", False) for p in engine.module.parameters()),
           "offload_same": id(offload) == offload_id, "module_hooks": _compat.zero3_module_hook_count(offload),
           "hooks_same": _compat.zero3_module_hook_count(offload) == hooks,
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


def compare(got: torch.Tensor, want: torch.Tensor, init: torch.Tensor) -> Dict:
    return {"max_abs_diff": (got - want).abs().max().item(), "mean_abs_diff": (got - want).abs().mean().item(),
            "mean_abs_update": (want - init).abs().mean().item()}


def close(engine) -> None:
    engine.destroy()
    engine.optimizer = None
    engine.lisa = None
    gc.collect()


def make_optimizer(kind: str, model):
    """(optimizer object or None, optimizer config or None) for a parity run."""
    if kind == "object":
        return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD), None
    params = dict(ADAMW, torch_adam=True) if kind == "config_torch" else ADAMW
    return None, {"type": "AdamW", "params": params}


# --- scenarios --------------------------------------------------------------------------------------

def parity(bf16: bool, policy: str, gas: int, interval: int, steps: int, optimizer: str,
           checkpointing: Optional[bool] = None, **cfg_kw) -> Dict:
    """Same seed, data and schedule as LisaOptimizer; ownership after every switch; frozen shards."""
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
    hooks = _compat.zero3_module_hook_count(offload)
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
    result["weights"] = got.tolist() if got.numel() < 200_000 else None
    close(engine)
    return result


def scenarios(out_dir: Path) -> Dict[str, Callable[[], Dict]]:
    return {
        "parity_fp32": lambda: parity(False, "reset", 1, 2, 8, "object"),
        "parity_fp32_offload_policy": lambda: parity(False, "offload", 1, 1, 8, "config_torch"),
        "parity_bf16_gas2": lambda: parity(True, "reset", 2, 2, 8, "config"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    table = scenarios(args.out)
    names = [n for n in args.only.split(",") if n] or list(table)
    results = {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = table[name]()
        results[name]["seconds"] = time.perf_counter() - t0
        if rank == 0:
            print(f"[zero3_checks] {name}: {results[name]['seconds']:.1f}s", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank{rank}.json").write_text(json.dumps(results, indent=1, default=str))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
