"""Per-GPU memory and time of full fine-tuning, naive `requires_grad` toggling and lisa_dist under
DeepSpeed ZeRO-2 and ZeRO-3 (phase 4 of benchmarks/gpu_validate.sh; runs on CPU too, for a smoke test).

    deepspeed --num_gpus N benchmarks/gpu_bench.py --out DIR [--hidden 2048 --layers 16 ...]

Memory is torch.cuda's view of the rank's device (allocated, reserved, peak allocated since the
mode's engine was built), so it is what the allocator really held: model states plus activations,
buckets and workspaces. Step time is the median of the steps that are neither the first of the run
nor the first after a switch; switch time and the first step after a switch are reported apart
(a ZeRO-3 step right after a rebuild runs without prefetch).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist

# After PYTHONPATH: gpu_validate.sh runs the lisa_dist it installed from the prepared wheel.
sys.path.append(str(Path(__file__).resolve().parents[1]))

import lisa_dist.backends.deepspeed as lds  # noqa: E402
from bench_common import add_model_args, build_model, machine, versions  # noqa: E402
from lisa_dist.backends.deepspeed import process_group  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.layers import split_parameters  # noqa: E402
from lisa_dist.memory import device_memory  # noqa: E402


def ds_config(stage: int, batch: int, bf16: bool) -> dict:
    return {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
            "bf16": {"enabled": bf16}, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "weight_decay": 0.0, "torch_adam": True}},
            "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                                  "stage3_param_persistence_threshold": 0}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_on(device: torch.device, a) -> torch.nn.Module:
    """The benchmark model made where it trains, in the dtype it trains in: on a GPU it is initialised
    there and cast to bf16 in place (built on the host, the 1 B model is 3.8 GB of fp32 through two
    CPU init passes and a pageable copy, per mode); the peak statistics are reset after."""
    with device:
        model = build_model(a)
    return model.to(torch.bfloat16) if device.type == "cuda" else model


def run_mode(mode: str, stage: int, a, device: torch.device) -> Dict:
    bf16 = device.type == "cuda"
    model = build_on(device, a)
    params = sum(p.numel() for p in model.parameters())
    lisa = LisaConfig(activated_layers=a.gamma, interval_steps=a.interval, seed=0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = ds_config(stage, a.batch, bf16)
    if mode == "lisa_dist":
        engine, _, _, _ = lds.initialize(model=model, config=cfg, lisa=lisa)
    else:
        import deepspeed
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        layers = split_parameters(model, lisa).per_layer
    g = torch.Generator().manual_seed(0)
    step_s: List[float] = []
    first_after_switch: List[float] = []
    after_switch = False
    for step in range(a.steps):
        if mode == "naive" and step % a.interval == 0:  # what LMFlow/axolotl's callbacks do
            active = {(step // a.interval * a.gamma + i) % len(layers) for i in range(a.gamma)}
            for i, layer in enumerate(layers):
                for _, p in layer:
                    p.requires_grad_(i in active)
        ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(device)
        sync(device)
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        sync(device)
        dt = time.perf_counter() - t0
        (first_after_switch if after_switch else step_s).append(dt)
        after_switch = mode == "lisa_dist" and engine.lisa.optimizer_steps % a.interval == 0
    switch_s = [e["seconds"] for e in engine.lisa.schedule_log[1:]] if mode == "lisa_dist" else []
    out = {"mode": mode, "stage": stage, "params": params, "device_memory": device_memory(),
           "median_step_seconds": statistics.median(step_s[1:]),
           "median_switch_seconds": statistics.median(switch_s) if switch_s else None,
           "median_first_step_after_switch_seconds": statistics.median(first_after_switch) if first_after_switch
           else None, "loss_last": loss.item()}
    engine.destroy()
    engine.optimizer = None
    del engine, model, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def markdown(result: Dict) -> str:
    gib = 2 ** 30
    lines = [f"# lisa_dist on {result['machine']['gpu'] or result['machine']['cpu']}", "",
             f"`{result['command']}`", "", f"versions: {json.dumps(result['versions'])}", "",
             f"model: {result['params'] / 1e9:.2f} B parameters, gamma={result['args']['gamma']}, "
             f"K={result['args']['interval']}, batch {result['args']['batch']} x {result['args']['seq']} tokens, "
             f"{result['world_size']} rank(s)", "",
             "| stage | mode | peak allocated GiB | reserved GiB | step s | switch s | first step after switch s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        m = r["device_memory"]
        lines.append(f"| ZeRO-{r['stage']} | {r['mode']} | {m.get('peak_allocated', 0) / gib:.2f} | "
                     f"{m.get('reserved', 0) / gib:.2f} | {r['median_step_seconds']:.3f} | "
                     f"{r['median_switch_seconds'] or 0:.3f} | "
                     f"{r['median_first_step_after_switch_seconds'] or 0:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--stages", default="2,3")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--local_rank", type=int, default=0)
    a = p.parse_args()
    process_group.ensure_initialized()
    device = process_group.rank_device()
    rows = []
    for stage in (int(s) for s in a.stages.split(",")):
        for mode in ("full", "naive", "lisa_dist"):
            rows.append(run_mode(mode, stage, a, device))
            if dist.get_rank() == 0:
                print(json.dumps(rows[-1]), flush=True)
    if dist.get_rank() == 0:
        params = rows[0]["params"]
        result = {"machine": machine(), "versions": versions(), "args": vars(a) | {"out": str(a.out)},
                  "world_size": dist.get_world_size(), "params": params, "rows": rows,
                  "command": " ".join(["deepspeed", "--num_gpus", str(dist.get_world_size())] + sys.argv)}
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "bench.json").write_text(json.dumps(result, indent=1))
        (a.out / "bench.md").write_text(markdown(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
