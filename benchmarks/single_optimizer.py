"""Single process: full AdamW vs LisaOptimizer on the embedded default (tiny-llama, shipped data).

Measures, side by side in one run on the same machine: optimizer-state + fp32-master bytes
(from the live tensors the optimizers hold) and the mean step time (forward + backward + step).
Writes benchmarks/results/single_optimizer.{json,md}.

    python benchmarks/single_optimizer.py [--steps 40] [--dtype fp32|bf16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

from bench_common import machine, optimizer_state_bytes, versions
from lisa_dist import LisaConfig
from lisa_dist.optim import LisaOptimizer
from lisa_dist.recipe import data, presets

RESULTS = Path(__file__).resolve().parent / "results"


def run(kind: str, args, dataset, tok):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(presets.PRESETS["tiny-llama"](tok)).to(args.dtype)
    if kind == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        opt = LisaOptimizer(model, LisaConfig(activated_layers=args.gamma, interval_steps=args.interval), lr=1e-3)
    batches = data.BatchIterator(dataset, args.batch_size, 0, tok.pad_token_id)
    times, peak = [], 0
    for step in range(args.steps):
        batch = batches.batch(step)
        start = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
        peak = max(peak, optimizer_state_bytes(opt, model))
    return {"optimizer_bytes_peak": peak, "step_seconds_median": statistics.median(times[args.warmup:]),
            "params": sum(p.numel() for p in model.parameters())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gamma", type=int, default=2)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = p.parse_args()
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tok = presets.default_tokenizer()
    dataset = data.build_dataset(presets.DEFAULT_DATA, tok, max_length=128)
    # Interleave the two so machine noise hits both alike.
    rows = {"full": [], "lisa": []}
    for _ in range(2):
        for kind in rows:
            rows[kind].append(run(kind, args, dataset, tok))
    full = {k: min(r[k] for r in rows["full"]) for k in rows["full"][0]}
    lisa = {k: min(r[k] for r in rows["lisa"]) for k in rows["lisa"][0]}
    result = {
        "command": "python benchmarks/single_optimizer.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "dtype") +
            f" --dtype {'bf16' if args.dtype == torch.bfloat16 else 'fp32'}",
        "machine": {**machine(), "torch_threads": torch.get_num_threads()},
        "versions": versions(),
        "config": {"model": "tiny-llama (8 layers, hidden 128)", "gamma": args.gamma, "K": args.interval,
                   "batch_size": args.batch_size, "dtype": str(args.dtype)},
        "full": full, "lisa": lisa,
        "optimizer_bytes_ratio_lisa_over_full": lisa["optimizer_bytes_peak"] / full["optimizer_bytes_peak"],
        "step_time_ratio_lisa_over_full": lisa["step_seconds_median"] / full["step_seconds_median"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "single_optimizer.json").write_text(json.dumps(result, indent=1))
    md = (f"# Single process: AdamW vs LisaOptimizer\n\n`{result['command']}`\n\n"
          f"Machine: {result['machine']}; versions: {result['versions']}; config: {result['config']}\n\n"
          "| optimizer | fp32 master + optimizer state (bytes) | median step (s) |\n|---|---|---|\n"
          f"| full AdamW | {full['optimizer_bytes_peak']:,} | {full['step_seconds_median']:.4f} |\n"
          f"| LisaOptimizer | {lisa['optimizer_bytes_peak']:,} | {lisa['step_seconds_median']:.4f} |\n"
          f"| ratio LISA/full | {result['optimizer_bytes_ratio_lisa_over_full']:.3f} | "
          f"{result['step_time_ratio_lisa_over_full']:.3f} |\n")
    (RESULTS / "single_optimizer.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
