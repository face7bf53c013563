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

    import lisa_dist.deepspeed as lds
    from lisa_dist.layers import split_parameters

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
