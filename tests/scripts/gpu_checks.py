"""Device-generic distributed checks: the `gpu` test tier and phase 1 of benchmarks/gpu_validate.sh.

    deepspeed --num_gpus N tests/scripts/gpu_checks.py --out DIR [--only a,b] [--switches 1000]

Every tensor lives on the rank's device (`lisa_dist.backends.deepspeed.process_group.rank_device`: CUDA +
NCCL on GPUs, CPU + gloo elsewhere, so the same script is smoke-tested on CPU). Scenarios: parity
with the single-process reference on the same device (ZeRO-2 fp32 with overlap_comm, ZeRO-2 bf16,
ZeRO-3), each rank's exact fp32 share of the active set, frozen layers bit-identical, flat
allocated memory over many switches, and FSDP2 (fp32 reduce-scatter after switches, a CPU-offload
step, offload resume with parked moments back on the host). Any failed check raises, so the rank
exits non-zero; OUT/rank<r>.json holds what was measured.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import builders  # noqa: E402
from builders import tiny_llama  # noqa: E402
from ds_common import close, run_scenarios  # noqa: E402
from live_tensors import live_tensor_bytes  # noqa: E402

import lisa_dist.backends.deepspeed as lds  # noqa: E402
from lisa_dist.backends.deepspeed import _compat, process_group  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.memory import device_memory  # noqa: E402
from lisa_dist.optim import LisaOptimizer  # noqa: E402

VOCAB, SEQ, MB = 256, 16, 2
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
ADAMW = {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD, "torch_adam": True}
DEVICE = torch.device("cpu")


def build_model(layers: int = 6, hidden: int = 64) -> LlamaForCausalLM:
    return tiny_llama(layers, hidden, vocab=VOCAB).to(DEVICE)


def ds_config(stage: int, bf16: bool, **zero) -> dict:
    return builders.ds_config(stage, MB, train_batch=MB * dist.get_world_size(), bf16=bf16,
                              optimizer={"type": "AdamW", "params": ADAMW}, **zero)


def global_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (dist.get_world_size() * MB, SEQ), generator=g).to(DEVICE)


def my_rows(step: int) -> torch.Tensor:
    r = dist.get_rank()
    return global_batch(step)[r * MB:(r + 1) * MB]


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def gathered_flat(engine) -> torch.Tensor:
    if engine.zero_optimization_stage() != 3:
        return flat(engine.module)
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().double().flatten() for p in params])


def share_ratio(engine) -> float:
    """This rank's fp32 master elements x world size / Psi_a: 1.0 (plus padding) is the exact share."""
    lisa, zero = engine.lisa, engine.optimizer
    stage3 = engine.zero_optimization_stage() == 3
    parts = _compat.zero3_fp32_partitions(zero) if stage3 else _compat.fp32_partitions(zero)
    active = lisa.split.always_params + lisa.split.layer_params(lisa.active_layers)
    psi_a = sum(getattr(p, "ds_numel", None) or p.numel() for p in active)
    return sum(t.numel() for t in parts) * dist.get_world_size() / psi_a


def frozen_snapshot(engine) -> Dict[int, List[torch.Tensor]]:
    lisa = engine.lisa
    stage3 = engine.zero_optimization_stage() == 3
    return {i: [(p.ds_tensor if stage3 else p).detach().clone() for _, p in layer]
            for i, layer in enumerate(lisa.split.per_layer) if i not in lisa.active_layers}


def parity(stage: int, bf16: bool, **zero) -> Dict:
    model = build_model()
    start = copy.deepcopy(model)
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=5)
    ref = copy.deepcopy(model).to(torch.bfloat16 if bf16 else torch.float32)
    opt = LisaOptimizer(ref, lisa, torch.optim.AdamW, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    steps = 7  # three switches
    for step in range(steps):
        ids = global_batch(step)
        ref(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    engine, _, _, _ = lds.initialize(model=model, config=ds_config(stage, bf16, **zero), lisa=lisa)
    assert engine.device == DEVICE, (engine.device, DEVICE)
    shares, frozen_checks = [share_ratio(engine)], 0
    for step in range(steps):
        before = frozen_snapshot(engine)
        ids = my_rows(step)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        after = frozen_snapshot(engine)
        for i in set(before) & set(after):
            assert all(torch.equal(a, b) for a, b in zip(before[i], after[i])), f"frozen layer {i} moved at {step}"
            frozen_checks += 1
        if engine.lisa.optimizer_steps % 2 == 0:
            shares.append(share_ratio(engine))
    got, want = gathered_flat(engine), flat(ref)
    init = flat(start.to(torch.bfloat16)) if bf16 else flat(start)
    diff, update = (got - want).abs().max().item(), (want - init).abs().mean().item()
    assert all(1.0 <= s <= 1.01 for s in shares), f"fp32 partitions are not this rank's share: {shares}"
    assert frozen_checks > 0 and update > 0
    # fp32: the same arithmetic in another order; bf16: a few bf16 ulps of the weights.
    assert diff <= (5e-2 if bf16 else 1e-4), f"parity: max |engine - reference| = {diff} (mean update {update})"
    switches = len(engine.lisa.schedule_log) - 1
    close(engine)
    return {"max_abs_diff": diff, "mean_abs_update": update, "shares": shares, "frozen_checks": frozen_checks,
            "switches": switches, "device_memory": device_memory()}


def flat_memory(switches: int, hidden: int, layers: int, vocab: int) -> Dict:
    """K=1: every step ends in a switch. Allocated bytes after each switch must not creep."""
    global VOCAB
    VOCAB = vocab
    model = build_model(layers, hidden)
    lisa = LisaConfig(activated_layers=2, interval_steps=1, seed=3)
    engine, _, _, _ = lds.initialize(model=model, config=ds_config(2, DEVICE.type == "cuda"), lisa=lisa)
    allocated, reserved, seconds = [], [], []
    for step in range(switches):
        ids = my_rows(step % 8)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        seconds.append(engine.lisa.schedule_log[-1]["seconds"])
        if DEVICE.type == "cuda":
            allocated.append(torch.cuda.memory_allocated())
            reserved.append(torch.cuda.memory_reserved())
        elif step in (10, switches - 1):
            allocated.append(live_tensor_bytes())
    settled = allocated[len(allocated) // 10:] if DEVICE.type == "cuda" else allocated
    growth = max(settled) - min(settled)
    assert growth <= max(2 ** 20, 0.01 * max(settled)), f"allocated memory grew by {growth} B over {switches} switches"
    if reserved:
        assert max(reserved) <= 1.25 * reserved[len(reserved) // 10], f"reserved memory kept growing: {reserved[::100]}"
    close(engine)
    return {"switches": switches, "allocated_first_last": [allocated[0], allocated[-1]], "growth_bytes": growth,
            "reserved_max": max(reserved) if reserved else None,
            "median_switch_seconds": sorted(seconds)[len(seconds) // 2]}


def fsdp2() -> Dict:
    from lisa_dist.backends.fsdp import FSDPRunner
    from fsdp_internals import unit_reduce_dtype

    from lisa_dist.backends.torch_compat import fsdp_units

    out = {}
    for offload in (False, True):
        model = build_model().to(torch.bfloat16)
        runner = FSDPRunner(model, LisaConfig(activated_layers=2, interval_steps=2, seed=7, state_policy="offload"),
                            lr=LR, cpu_offload=offload)
        for step in range(5):
            ids = my_rows(step)
            runner.train_step([{"input_ids": ids, "labels": ids}])
        dtypes = {unit_reduce_dtype(u) for u in fsdp_units(runner.model) if any(p.requires_grad for p in u.parameters())}
        assert dtypes == {torch.float32}, f"active FSDP2 units reduce in {dtypes}"
        parked = [t for layer in runner.optimizer._offloaded.values() for m, st in layer.values()
                  for t in [m, *st.values()] if torch.is_tensor(t)]
        assert parked and all((t.to_local() if hasattr(t, "to_local") else t).device.type == "cpu" for t in parked)
        if not offload:  # resume: parked moments must come back to the host, not the GPU
            ckpt = Path(tempfile.mkdtemp(prefix="lisa_gpu_fsdp")) if dist.get_rank() == 0 else None
            holder = [str(ckpt) if ckpt else None]
            dist.broadcast_object_list(holder)
            runner.save_checkpoint(Path(holder[0]), 5)
            runner.load_checkpoint(Path(holder[0]))
            reloaded = [t for layer in runner.optimizer._offloaded.values() for m, st in layer.values()
                        for t in [m, *st.values()] if torch.is_tensor(t)]
            assert reloaded and all((t.to_local() if hasattr(t, "to_local") else t).device.type == "cpu"
                                    for t in reloaded), "offloaded moments came back on the accelerator"
        out["cpu_offload" if offload else "plain"] = {"reduce_dtypes": sorted(map(str, dtypes)), "parked": len(parked)}
        runner.optimizer.zero_grad()
        del runner, model
    return out


def main() -> None:
    global DEVICE
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", default="")
    p.add_argument("--switches", type=int, default=100)
    p.add_argument("--hidden", type=int, default=64, help="flat_memory model")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    process_group.ensure_initialized()
    DEVICE = process_group.rank_device()
    torch.set_num_threads(1)
    table = {
        "zero2_fp32_overlap": lambda: parity(2, False, overlap_comm=True, contiguous_gradients=True),
        "zero2_bf16": lambda: parity(2, True),
        "zero3": lambda: parity(3, False, stage3_param_persistence_threshold=0),
        "flat_memory": lambda: flat_memory(a.switches, a.hidden, a.layers, a.vocab),
        "fsdp2": fsdp2,
    }
    names = [n for n in a.only.split(",") if n] or list(table)
    t0 = time.perf_counter()
    run_scenarios(table, names, a.out, f"gpu_checks on {DEVICE}")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"gpu_checks: {len(names)} scenarios in {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
