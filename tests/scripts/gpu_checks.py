"""Device-generic distributed checks: the `gpu` test tier and the checks and flat phases of
benchmarks/gpu_validate.sh.

    deepspeed --num_gpus N tests/scripts/gpu_checks.py --out DIR [--only a,b] [--switches 600]

Every tensor lives on the rank's device (`lisa_dist.backends.deepspeed.process_group.rank_device`: CUDA
with a `cpu:gloo,cuda:nccl` group on GPUs, CPU + gloo elsewhere, so the same script is rehearsed on a
CPU). Scenarios (SCENARIOS below): parity with the single-process reference on the same device (ZeRO-2
fp32 with overlap_comm, ZeRO-2 bf16, ZeRO-3, ZeRO-3 with offload_param and pinned shards), each rank's
exact fp32 share, frozen layers bit-identical, fp16 dynamic loss scaling across switches, a ZeRO-2
resume that continues exactly, FSDP2 (fp32 reduce-scatter after switches, a CPU-offload step, offload
resume with parked moments on the host), the HF Trainer with LisaCallback and a hand-written accelerate
loop (lisa_dist.accelerate.prepare) on the installed transformers/accelerate, and flat memory over
many switches.

Each scenario's measurements are written (OUT/rank<r>.json) before its verdict: a scenario returns
what it measured and raises CheckFailed carrying it when a check fails; the next scenario still runs,
and the rank exits 1 at the end when any failed.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

# After PYTHONPATH: gpu_validate.sh runs the lisa_dist it installed from the prepared wheel; the tests
# (PYTHONPATH=repo) and a plain checkout import the tree's.
sys.path.append(str(Path(__file__).resolve().parents[2]))
sys.path.append(str(Path(__file__).resolve().parents[1] / "support"))

from live_tensors import live_tensor_bytes  # noqa: E402

import builders  # noqa: E402
import lisa_dist  # noqa: E402
import lisa_dist.backends.deepspeed as lds  # noqa: E402
from builders import tiny_llama  # noqa: E402
from lisa_dist.backends.deepspeed import _compat, process_group  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.memory import device_memory  # noqa: E402
from lisa_dist.optim import LisaOptimizer  # noqa: E402

VOCAB, SEQ, MB = 256, 16, 2
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
ADAMW = {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WD, "torch_adam": True}
DEVICE = torch.device("cpu")


class CheckFailed(AssertionError):
    """A failed check, with everything the scenario measured before it."""

    def __init__(self, message: str, measured: Dict):
        super().__init__(message)
        self.measured = measured


def verdict(measured: Dict, checks: Dict[str, bool]) -> Dict:
    """Record every named check in `measured`, then raise CheckFailed naming those that failed."""
    measured["checks"] = {name: bool(ok) for name, ok in checks.items()}
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise CheckFailed(f"check(s) failed: {', '.join(failed)}", measured)
    return measured


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


def gathered_flat(engine_or_module) -> torch.Tensor:
    module = getattr(engine_or_module, "module", engine_or_module)
    params = list(module.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        return flat(module)
    import deepspeed
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().double().flatten() for p in params])


def ranks_identical(module) -> bool:
    w = flat(module)
    gathered = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, w)
    return all(torch.equal(gathered[0], g) for g in gathered)


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


def pinned_shards(engine) -> Dict:
    """ZeRO-3 offload_param: where each parameter's shard lives and whether it is page-locked (as
    DeepSpeed's accelerator sees it; only CUDA pins host memory)."""
    from deepspeed.accelerator import get_accelerator
    shards = [p.ds_tensor.detach() for p in engine.module.parameters()]  # the memory, not the object's flags
    return {"shards": len(shards), "on_host": sum(t.device.type == "cpu" for t in shards),
            "pinned": sum(bool(get_accelerator().is_pinned(t)) for t in shards)}


def close(engine) -> None:
    from ds_common import close as close_engine
    close_engine(engine)


def shared_tmpdir(prefix: str) -> Path:
    """One temporary folder for every rank (rank 0 makes it)."""
    holder = [tempfile.mkdtemp(prefix=prefix) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder)
    return Path(holder[0])


# --- DeepSpeed -------------------------------------------------------------------------------------

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
    pinned_at_start = pinned_shards(engine) if "offload_param" in zero else None
    shares, frozen_checks, frozen_moved = [share_ratio(engine)], 0, []
    for step in range(steps):
        before = frozen_snapshot(engine)
        ids = my_rows(step)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        after = frozen_snapshot(engine)
        for i in set(before) & set(after):
            if not all(torch.equal(a, b) for a, b in zip(before[i], after[i])):
                frozen_moved.append((step, i))
            frozen_checks += 1
        if engine.lisa.optimizer_steps % 2 == 0:
            shares.append(share_ratio(engine))
    got, want = gathered_flat(engine), flat(ref)
    init = flat(start.to(torch.bfloat16)) if bf16 else flat(start)
    diff, update = (got - want).abs().max().item(), (want - init).abs().mean().item()
    out = {"engine_device": str(engine.device), "max_abs_diff": diff, "mean_abs_update": update, "shares": shares,
           "frozen_checks": frozen_checks, "frozen_moved": frozen_moved,
           "switches": len(engine.lisa.schedule_log) - 1,
           "switch_seconds": [e["seconds"] for e in engine.lisa.schedule_log[1:]], "device_memory": device_memory()}
    if "offload_param" in zero:
        out["offload_param"] = {**pinned_shards(engine), "pinned_at_start": pinned_at_start["pinned"]}
    close(engine)
    checks = {
        "engine on the rank's device": out["engine_device"] == str(DEVICE),
        "fp32 partitions are this rank's share": all(1.0 <= s <= 1.01 for s in shares),
        "frozen layers bit-identical": frozen_checks > 0 and not frozen_moved,
        "trained": update > 0,
        # fp32: the same arithmetic in another order; bf16: a few bf16 ulps of the weights.
        "parity with the single-process reference": diff <= (5e-2 if bf16 else 1e-4),
    }
    if "offload_param" in zero:
        shards = out["offload_param"]
        checks["offload_param shards on the host"] = shards["on_host"] == shards["shards"]
        if DEVICE.type == "cuda" and zero["offload_param"].get("pin_memory"):
            checks["offload_param shards pinned at the start"] = shards["pinned_at_start"] > 0
            checks["offload_param shards stay pinned across switches"] = shards["pinned"] >= shards["pinned_at_start"]
    return verdict(out, checks)


def fp16_loss_scale() -> Dict:
    """ZeRO-2 fp16: the dynamic loss scaler goes through every rebuild, forced overflows included
    (ds_common.overflow_schedule asserts the scaler against a replica after each step)."""
    from ds_common import allow_fp16_on_cpu, overflow_schedule
    if DEVICE.type == "cpu":
        allow_fp16_on_cpu()
    model = build_model()
    start = copy.deepcopy(model).half()
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=4, state_policy="offload")
    cfg = ds_config(2, False)
    cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 10, "loss_scale_window": 3,
                   "hysteresis": 2, "min_loss_scale": 1}
    engine, _, _, _ = lds.initialize(model=model, config=cfg, lisa=lisa)
    return overflow_schedule(engine, lambda step, gas: [my_rows(step)], start, close, flat, ranks_identical,
                             lambda: None)


def resume() -> Dict:
    """ZeRO-2 with state_policy="offload": stop mid-interval, save, load into a fresh engine and go
    on; the weights must be those of the run that never stopped."""
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=6, state_policy="offload")
    cfg = ds_config(2, False)
    total, cut = 6, 3
    folder = shared_tmpdir("lisa_gpu_resume")

    def train(engine, steps):
        for step in steps:
            ids = my_rows(step)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()

    straight, _, _, _ = lds.initialize(model=build_model(), config=cfg, lisa=lisa)
    train(straight, range(cut))
    straight.save_checkpoint(str(folder), tag="cut")
    train(straight, range(cut, total))
    want, want_schedule = flat(straight.module), [e["active_layers"] for e in straight.lisa.schedule_log]
    close(straight)
    resumed, _, _, _ = lds.initialize(model=build_model(), config=cfg, lisa=lisa)
    resumed.load_checkpoint(str(folder), tag="cut")
    train(resumed, range(cut, total))
    got, got_schedule = flat(resumed.module), [e["active_layers"] for e in resumed.lisa.schedule_log]
    out = {"max_abs_diff": (got - want).abs().max().item(), "steps": total, "saved_at": cut,
           "schedule_straight": want_schedule, "schedule_resumed": got_schedule,
           "optimizer_steps": resumed.lisa.optimizer_steps}
    close(resumed)
    return verdict(out, {"resumed weights equal the uninterrupted run's": out["max_abs_diff"] <= 1e-6,
                         "same active layers at the end": bool(got_schedule) and got_schedule[-1] == want_schedule[-1],
                         "steps counted": out["optimizer_steps"] == total})


# --- flat memory -------------------------------------------------------------------------------------

def flat_memory(switches: int, hidden: int, layers: int, vocab: int) -> Dict:
    """K=1, so every step ends in a ZeRO-2 rebuild. Recorded after every step: allocated bytes (CUDA)
    or live tensor bytes (CPU), and the engine's optimizer bytes (masters, moments, gradient
    partitions). The optimizer bytes move by design (a layer drawn again keeps its moments; a new one
    has none until its first step: one hidden-768 layer's moments are ~42 MB), so what must stay flat
    is the rest, memory minus optimizer bytes, and the raw series may not trend upwards."""
    from lisa_dist.backends.deepspeed.state_bytes import optimizer_bytes
    global VOCAB
    VOCAB = vocab
    model = build_model(layers, hidden)
    cuda = DEVICE.type == "cuda"
    lisa = LisaConfig(activated_layers=2, interval_steps=1, seed=3)
    engine, _, _, _ = lds.initialize(model=model, config=ds_config(2, cuda), lisa=lisa)
    memory, reserved, optimizer, seconds = [], [], [], []
    t0 = time.perf_counter()
    for step in range(switches):
        ids = my_rows(step % 8)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        seconds.append(engine.lisa.schedule_log[-1]["seconds"])
        optimizer.append(optimizer_bytes(engine))
        if cuda:
            memory.append(torch.cuda.memory_allocated())
            reserved.append(torch.cuda.memory_reserved())
        else:
            memory.append(live_tensor_bytes())
    wall = time.perf_counter() - t0
    close(engine)
    rest = [m - o for m, o in zip(memory, optimizer)]
    w = max(1, switches // 10)
    settled = rest[w:]
    tol = max(2 ** 20, 0.01 * max(memory))

    def median(xs):
        return sorted(xs)[len(xs) // 2]

    out = {"switches": switches, "model": {"hidden": hidden, "layers": layers, "vocab": vocab},
           "memory_kind": "torch.cuda.memory_allocated" if cuda else "live_tensor_bytes",
           "memory": memory, "optimizer_bytes": optimizer, "reserved": reserved or None,
           "tolerance_bytes": tol, "rest_spread_bytes": max(settled) - min(settled),
           "early_median": median(memory[w:2 * w]), "late_median": median(memory[-w:]),
           "median_switch_seconds": median(seconds), "seconds_per_step_and_switch": wall / switches}
    checks = {"memory minus optimizer bytes flat": out["rest_spread_bytes"] <= tol,
              "memory does not trend upwards": out["late_median"] <= out["early_median"] + tol}
    if reserved:
        checks["reserved memory bounded"] = max(reserved[-w:]) <= 1.25 * max(reserved[w:2 * w]) + tol
    return verdict(out, checks)


# --- FSDP2 -----------------------------------------------------------------------------------------

def fsdp2() -> Dict:
    from fsdp_internals import unit_reduce_dtype

    from lisa_dist.backends.fsdp import FSDPRunner
    from lisa_dist.backends.torch_compat import fsdp_units

    out, checks = {}, {}

    def parked(runner):
        return [t for layer in runner.optimizer._offloaded.values() for m, st in layer.values()
                for t in [m, *st.values()] if torch.is_tensor(t)]

    def on_host(ts):
        return bool(ts) and all((t.to_local() if hasattr(t, "to_local") else t).device.type == "cpu" for t in ts)

    for offload in (False, True):
        name = "cpu_offload" if offload else "plain"
        model = build_model().to(torch.bfloat16)
        runner = FSDPRunner(model, LisaConfig(activated_layers=2, interval_steps=2, seed=7, state_policy="offload"),
                            lr=LR, cpu_offload=offload)
        losses = [runner.train_step([{"input_ids": my_rows(step), "labels": my_rows(step)}]) for step in range(5)]
        dtypes = {unit_reduce_dtype(u) for u in fsdp_units(runner.model)
                  if any(p.requires_grad for p in u.parameters())}
        out[name] = {"reduce_dtypes": sorted(map(str, dtypes)), "parked": len(parked(runner)), "losses": losses,
                     "switch_seconds": [e["seconds"] for e in runner.schedule_log[1:]]}
        checks[f"{name}: active units reduce in fp32"] = dtypes == {torch.float32}
        checks[f"{name}: parked moments on the host"] = on_host(parked(runner))
        if not offload:  # resume: parked moments must come back to the host, not the GPU
            folder = shared_tmpdir("lisa_gpu_fsdp")
            runner.save_checkpoint(folder, 5)
            runner.load_checkpoint(folder)
            checks["resume: parked moments back on the host"] = on_host(parked(runner))
        runner.close()
        del runner, model
    return verdict(out, checks)


# --- Hugging Face ------------------------------------------------------------------------------------

class SameRows(torch.utils.data.Dataset):
    """One sequence, repeated: every batch is the same whatever order and rank reads it, so a plain
    LisaOptimizer loop is the Trainer's exact reference."""

    def __init__(self, n: int = 64):
        self.ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(7))
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": self.ids, "labels": self.ids}


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def trainer() -> Dict:
    """transformers.Trainer with LisaCallback on this device (no DeepSpeed): its default optimizer
    (fused AdamW on CUDA), the LISA switches, and parity with a LisaOptimizer over the same batches."""
    from transformers import Trainer, TrainingArguments

    from lisa_dist.integrations.hf import LisaCallback

    reset_accelerate()
    steps, lisa = 6, LisaConfig(activated_layers=2, interval_steps=2, seed=8)
    model = build_model()
    start = copy.deepcopy(model)
    folder = shared_tmpdir("lisa_gpu_trainer")
    args = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=MB, max_steps=steps,
                             learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=DEVICE.type == "cpu",
                             dataloader_num_workers=0, seed=0)
    cb = LisaCallback(lisa)
    run = Trainer(model=model, args=args, train_dataset=SameRows(), callbacks=[cb])
    run.train()
    from lisa_dist.integrations.accelerate import prepared_state
    state = prepared_state(run.model)
    inner = state.optimizer._inner
    masters_on_device = all(m.device == p.device for p, m in state.optimizer._masters.items())
    got = flat(run.model)
    # The reference: the same optimizer class and group options (the Trainer's lr, betas, eps, weight
    # decay; fused by default), the same batch each step.
    ref, init = start, flat(start)
    ref_opt = LisaOptimizer(ref, lisa, type(inner), **{k: v for k, v in inner.param_groups[0].items()
                                                       if k in ("lr", "betas", "eps", "weight_decay", "fused",
                                                                "foreach", "amsgrad")})
    ids = SameRows().ids.to(DEVICE).expand(MB, SEQ)
    for _ in range(steps):
        ref(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    diff = (got - flat(ref)).abs().max().item()
    update = (flat(ref) - init).abs().mean().item()
    out = {"backend": state.backend, "optimizer": type(inner).__name__,
           "fused": bool(inner.param_groups[0].get("fused")), "switch_index": state.switch_index,
           "active_layers": list(state.active_layers), "max_abs_diff": diff,
           "losses": [e["loss"] for e in run.state.log_history if "loss" in e]}
    reset_accelerate()
    return verdict(out, {"switched every 2 steps": state.switch_index == steps // 2,
                         "masters on the parameters' device": masters_on_device,
                         "trained": update > 0,
                         "parity with a LisaOptimizer loop": diff <= 1e-4})


def accelerate_loop() -> Dict:
    """lisa_dist.accelerate.prepare in a hand-written loop over a bf16 model built on the host:
    prepare must put the model on the accelerator before LISA makes fp32 masters of it (C1)."""
    from accelerate import Accelerator

    from lisa_dist.accelerate import prepare, prepared_state

    reset_accelerate()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).to(torch.bfloat16)  # on the host
    before = flat(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    acc = Accelerator(cpu=DEVICE.type == "cpu")
    loader = torch.utils.data.DataLoader(SameRows(), batch_size=MB)
    model, opt, loader = prepare(acc, model, opt, loader, lisa=LisaConfig(activated_layers=2, interval_steps=2,
                                                                           seed=9))
    state = prepared_state(model.module if hasattr(model, "module") else model)
    masters = state.optimizer._masters
    devices = sorted({f"{p.device}->{m.device}" for p, m in masters.items()})
    losses = []
    for _, batch in zip(range(5), loader):
        loss = model(**batch).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    out = {"backend": state.backend, "param_to_master_devices": devices, "losses": losses,
           "switch_index": state.switch_index, "model_device": str(next(model.parameters()).device),
           "accelerator_device": str(acc.device)}
    moved = (flat(model) - before.to(DEVICE)).abs().max().item()
    reset_accelerate()
    placed = same_device(out["model_device"], out["accelerator_device"])
    return verdict(out, {"model on the accelerator's device": placed,
                         "masters on the parameters' device": all(p.device == m.device for p, m in masters.items()),
                         "trained": moved > 0, "losses finite": all(abs(v) < 1e9 for v in losses)})


def same_device(a: str, b: str) -> bool:
    """"cuda" (accelerate's device on one GPU) names the current CUDA device, e.g. "cuda:0"."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


SCENARIOS: Dict[str, Callable[[argparse.Namespace], Dict]] = {
    "zero2_fp32_overlap": lambda a: parity(2, False, overlap_comm=True, contiguous_gradients=True),
    "zero2_bf16": lambda a: parity(2, True),
    "zero3": lambda a: parity(3, False, stage3_param_persistence_threshold=0),
    "zero3_offload_param": lambda a: parity(3, False, stage3_param_persistence_threshold=0,
                                            offload_param={"device": "cpu", "pin_memory": True}),
    "fp16_loss_scale": lambda a: fp16_loss_scale(),
    "resume": lambda a: resume(),
    "fsdp2": lambda a: fsdp2(),
    "trainer": lambda a: trainer(),
    "accelerate_loop": lambda a: accelerate_loop(),
    "flat_memory": lambda a: flat_memory(a.switches, a.hidden, a.layers, a.vocab),
}
DEFAULT = [n for n in SCENARIOS if n != "flat_memory"]


def init_process_group() -> None:
    """On GPUs a `cpu:gloo,cuda:nccl` group, before DeepSpeed would make an NCCL-only one: FSDP2's
    cpu_offload reduces host tensors (lisa_dist refuses it on a group without a CPU backend)."""
    device = process_group.rank_device()
    if device.type == "cuda" and not dist.is_initialized():
        from lisa_dist.backends.fsdp.runner import process_group_backend
        dist.init_process_group(process_group_backend(device), device_id=device)
    process_group.ensure_initialized()


def main() -> None:
    global DEVICE
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", default="", help=f"comma-separated, of {','.join(SCENARIOS)}; default all but flat_memory")
    p.add_argument("--switches", type=int, default=100, help="flat_memory")
    p.add_argument("--hidden", type=int, default=64, help="flat_memory model")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=VOCAB)
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    names = [n for n in a.only.split(",") if n] or DEFAULT
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    init_process_group()
    DEVICE = process_group.rank_device()
    torch.set_num_threads(1)
    rank = dist.get_rank()
    results: Dict[str, Dict] = {"_run": {"device": str(DEVICE), "world_size": dist.get_world_size(),
                                         "lisa_dist": str(Path(lisa_dist.__file__).parent),
                                         "process_group": dist.get_backend_config()}}
    failed = []
    t0 = time.perf_counter()
    for name in names:
        start = time.perf_counter()
        try:
            results[name] = SCENARIOS[name](a)
        except CheckFailed as e:
            results[name] = {**e.measured, "error": str(e)}
            failed.append(name)
        except Exception as e:  # noqa: BLE001 - recorded, and the rank exits 1 below
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            failed.append(name)
        results[name]["seconds"] = time.perf_counter() - start
        results[name]["passed"] = name not in failed
        if rank == 0:
            print(f"[gpu_checks on {DEVICE}] {name}: {'passed' if name not in failed else 'FAILED'} "
                  f"({results[name]['seconds']:.1f}s){'' if name not in failed else ' ' + results[name]['error']}",
                  flush=True)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"rank{rank}.json").write_text(json.dumps(results, indent=1, default=str))
    if rank == 0:
        print(f"gpu_checks: {len(names) - len(failed)}/{len(names)} scenarios passed in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
