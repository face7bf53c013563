"""Pieces shared by the DeepSpeed check scripts that pytest launches (zero12, zero3, checkpoint)."""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Callable, Dict, Sequence

import torch
import torch.distributed as dist


def compare(got: torch.Tensor, want: torch.Tensor, init: torch.Tensor) -> Dict:
    """Distance of flat weights `got` from the reference `want`, next to the size of the update."""
    return {"max_abs_diff": (got - want).abs().max().item(), "mean_abs_diff": (got - want).abs().mean().item(),
            "mean_abs_update": (want - init).abs().mean().item()}


def close(engine) -> None:
    """Free an engine before the next one is built (its buffers would otherwise count as leaks)."""
    engine.destroy()
    engine.optimizer = None
    engine.lisa = None
    gc.collect()


def settled_live_bytes() -> int:
    """live_tensor_bytes once the last collective's buffers are gone. gloo's worker thread drops its
    reference to a finished all-gather's tensors (the switch's agreement gather: 2 ranks x 3 int64 =
    48 bytes) on its own schedule, so a single walk right after a step sometimes still counts them;
    the second walk, a second or more later, sees the settled state. Not a tolerance: a real leak is
    in both walks."""
    from live_tensors import live_tensor_bytes
    return min(live_tensor_bytes(), live_tensor_bytes())


def run_scenarios(table: Dict[str, Callable[[], Dict]], names: Sequence[str], out: Path, label: str) -> None:
    """Run the named scenarios in order, writing every rank's results after each one (so a crash
    still leaves what finished), then tear the process group down cleanly."""
    rank = dist.get_rank()
    results = {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = table[name]()
        results[name]["seconds"] = time.perf_counter() - t0
        if rank == 0:
            print(f"[{label}] {name}: {results[name]['seconds']:.1f}s", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1, default=str))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def naive_toggling_bytes(model, cfg: dict, lisa, gamma: int, micro_batches: Callable[[int, int], Sequence]) -> Dict:
    """Model-state bytes of what LMFlow/axolotl/ms-swift do: DeepSpeed built over every parameter,
    then requires_grad toggled to the first `gamma` layers, after two steps."""
    import deepspeed

    import lisa_dist.backends.deepspeed as lds
    from lisa_dist.backends.deepspeed import _compat
    from lisa_dist.layers import split_parameters

    # The build fix lets DeepSpeed < 0.19 itself run 2 ranks on torch 2.13 (see _compat); the
    # baseline measured is DeepSpeed's own ZeRO optimizer either way.
    with _compat.zero12_build_fixes():
        naive, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    for i, layer in enumerate(split_parameters(model, lisa).per_layer):
        for _, p in layer:
            p.requires_grad_(i < gamma)
    for step in range(2):
        for ids in micro_batches(step, 1):
            naive.backward(naive(input_ids=ids, labels=ids).loss)
            naive.step()
    measured = lds.model_state_bytes(naive)
    naive.destroy()
    del naive
    gc.collect()
    return measured


def allow_fp16_on_cpu() -> None:
    """DeepSpeed's CPU accelerator reports fp16 as unsupported unless oneDNN has fp16 kernels, and
    the engine refuses fp16 then (engine.py: "Type fp16 is not supported on your device"). torch
    computes fp16 on CPU all the same (slowly), so the checks lift the gate to run DeepSpeed's real
    fp16 path: fp16 flat buffers, overflow detection and the dynamic loss scaler."""
    from deepspeed.accelerator import get_accelerator
    type(get_accelerator()).is_fp16_supported = lambda self: True


SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis", "scale_window", "delayed_shift")


def loss_scaler_fields(scaler) -> Dict:
    return {k: getattr(scaler, k) for k in SCALER_FIELDS if hasattr(scaler, k)}


# optimizer step -> ranks whose loss is blown up to overflow fp16 gradients (K=2: switches after
# steps 2, 4, 6, i.e. after step indices 1, 3, 5)
OVERFLOWS = {1: "all", 2: "rank1", 5: "all"}
FP16_STEPS = 8


def overflow_schedule(engine, micro_batches: Callable, start, close_fn, flat_weights, ranks_identical,
                      on_switch: Callable) -> Dict:
    """Drive an fp16 engine through OVERFLOWS and compare its loss scaler with a replica after each
    step (see zero12_checks.fp16_loss_scale). `flat_weights` may be collective (ZeRO-3 gathers)."""
    import copy

    replica = copy.deepcopy(engine.optimizer.loss_scaler)
    rank, lisa = dist.get_rank(), engine.lisa
    trace, mismatches, skipped = [], [], []
    for step in range(FP16_STEPS):
        before = int(engine.skipped_steps)
        for ids in micro_batches(step, 1):
            loss = engine(input_ids=ids, labels=ids).loss
            who = OVERFLOWS.get(step)
            if who == "all" or (who == "rank1" and rank == 1):
                loss = loss * 1e10  # fp16 gradients overflow to inf once scaled
            engine.backward(loss)
            engine.step()
        # an overflow on any rank is every rank's (ZeRO reduces the flag); rank 1 may not exist
        overflow = OVERFLOWS.get(step) == "all" or (OVERFLOWS.get(step) == "rank1" and dist.get_world_size() > 1)
        replica.update_scale(overflow)
        skipped.append(int(engine.skipped_steps) - before)
        got, want = loss_scaler_fields(engine.optimizer.loss_scaler), loss_scaler_fields(replica)
        trace.append({"step": step, "switch_index": lisa.switch_index, "scaler": got})
        if got != want:
            mismatches.append({"step": step, "got": got, "want": want})
        if lisa.optimizer_steps % lisa.config.interval_steps == 0:
            on_switch()
    assert not mismatches, f"loss scaler not carried across switches: {mismatches}"
    assert sum(skipped) == len(OVERFLOWS) - (dist.get_world_size() == 1), f"skipped steps {skipped}"
    update = (flat_weights(engine.module) - flat_weights(start)).abs().max().item()
    assert update > 0, "nothing trained"
    # ZeRO-3 holds one copy of the weights across ranks: nothing to compare (None)
    identical = ranks_identical(engine.module) if ranks_identical is not None else None
    assert identical is not False, "ranks diverged"
    result = {"trace": trace, "skipped": skipped, "switches": lisa.switch_index, "ranks_identical": identical,
              "max_update": update, "final_scale": float(engine.optimizer.loss_scaler.cur_scale)}
    close_fn(engine)
    return result
