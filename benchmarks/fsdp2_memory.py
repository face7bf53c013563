"""FSDP2: full fine-tuning vs lisa_dist, side by side in one run.

    # CPU/gloo, writes benchmarks/results/fsdp2.{json,md}
    torchrun --nproc_per_node 2 benchmarks/fsdp2_memory.py
    torchrun --nproc_per_node 8 benchmarks/fsdp2_memory.py --hidden 4096 --layers 32 ...   # a GPU node

Rows:
- full: what an FSDP2 user writes for full fine-tuning: fp32 sharded parameters (they are the
  masters), MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), AdamW over everything.
- lisa_all: lisa_dist with every layer active (gamma = number of layers): the same work as full,
  on lisa_dist's layout (bf16 sharded weights, fp32 masters), to separate layout from LISA.
- lisa: lisa_dist with gamma layers.

Per row: model-state bytes per rank measured from live tensors at the fullest moment (inside the
optimizer step, after the update) against lisa_dist.memory.model_state_floor; gradient collectives
per step, counted at the ProcessGroup methods (benchmarks/collective_count.py; bytes are the logical
tensor: the reduce-scatter input, i.e. the unsharded gradient buffer each rank contributes, and the
all-gather output, i.e. the unsharded parameters); step time with the runners' steps interleaved, so
load from other processes hits every row alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402

from bench_common import add_model_args, build_model, machine, versions, write_report  # noqa: E402
from collective_count import count_collectives  # noqa: E402
from lisa_dist.backends.fsdp import FSDPRunner, init_distributed  # noqa: E402
from lisa_dist.backends.fsdp.shard import default_device  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.layers import split_parameters  # noqa: E402
from lisa_dist.memory import count_params, format_bytes, model_state_floor  # noqa: E402
from lisa_dist.memory import local_tensor_bytes as local_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fsdp2")
    return p.parse_args()


def batch(args, step: int, device) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


class FullFSDP:
    """Plain FSDP2 full fine-tuning, the baseline (one unit per decoder layer + root, like shard_model)."""

    def __init__(self, args, lr: float):
        self.device = default_device()
        self.model = build_model(args).to(torch.float32)
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        layers = self.model.model.layers
        for i, layer in enumerate(layers):
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
        fully_shard(self.model, mesh=mesh, mp_policy=mp)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr)
        self.peak: Dict[str, int] = {}
        self.optimizer.register_step_post_hook(lambda *_: self._measure())

    def _measure(self) -> None:
        params = list(self.model.parameters())
        state = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        # fp32 params are the masters: count them as weights and report master as 0.
        self.peak = {"weights": local_bytes(params),
                     "grads": local_bytes([p.grad for p in params if p.grad is not None]),
                     "master": 0, "optimizer_state": local_bytes(state), "transient_fp32_grads": 0}

    def train_step(self, micro: List[Dict[str, torch.Tensor]]) -> float:
        total = 0.0
        for b in micro:
            loss = self.model(**b).loss / len(micro)
            loss.backward()
            total += loss.item()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return total

    def close(self) -> None:
        del self.optimizer, self.model


class Lisa:
    """FSDPRunner with a hook that measures model states at the fullest moment of the step."""

    def __init__(self, args, lr: float, gamma: int):
        lisa = LisaConfig(activated_layers=gamma, interval_steps=args.interval, seed=0)
        self.runner = FSDPRunner(build_model(args).to(torch.bfloat16), lisa, lr=lr, max_grad_norm=0.0)
        self.device = self.runner.device
        self.peak: Dict[str, int] = {}
        self.runner.optimizer._inner.register_step_post_hook(lambda *_: self._measure())

    def _measure(self) -> None:
        opt = self.runner.optimizer
        params = list(self.runner.model.parameters())
        b = opt.state_bytes()
        masters = [m for p, m in opt._masters.items() if m is not p]
        # LisaOptimizer hands the inner optimizer fp32 copies of the gradients, alive during step().
        self.peak = {"weights": local_bytes(params),
                     "grads": local_bytes([p.grad for p in params if p.grad is not None]),
                     "master": b["master"], "optimizer_state": b["optimizer_state"],
                     "transient_fp32_grads": local_bytes([m.grad for m in masters if m.grad is not None])}

    def train_step(self, micro: List[Dict[str, torch.Tensor]]) -> float:
        return self.runner.train_step(micro)

    def close(self) -> None:
        self.runner.close()


def frozen_backward_control(args) -> Dict[str, float]:
    """No FSDP: forward+backward time with gamma layers trainable / with all trainable, per dtype.
    What freezing layers can save on this machine's kernels, to read the FSDP2 ratio against."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = build_model(args).to(dtype)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        best = {}
        for mode in ("full", "lisa") * 2:
            for i, layer in enumerate(model.model.layers):
                layer.requires_grad_(mode == "full" or i < args.gamma)
            for _ in range(3):
                start = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
        out[str(dtype).replace("torch.", "")] = best["lisa"] / best["full"]
        del model
    return out


def environment(args) -> Dict:
    return {"machine": {**machine(), "backend": dist.get_backend(), "world_size": dist.get_world_size()},
            "versions": versions(),
            "command": " ".join([f"torchrun --nproc_per_node {dist.get_world_size()} benchmarks/fsdp2_memory.py",
                                 *sys.argv[1:]]),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def run(args) -> Dict:
    world = dist.get_world_size()
    rows: Dict[str, Callable[[], object]] = {
        "full": lambda: FullFSDP(args, lr=1e-4),
        "lisa_all": lambda: Lisa(args, lr=1e-4, gamma=args.layers),
        "lisa": lambda: Lisa(args, lr=1e-4, gamma=args.gamma),
    }
    control = frozen_backward_control(args)
    runners = {name: make() for name, make in rows.items()}
    times: Dict[str, List[float]] = {name: [] for name in runners}
    comm: Dict[str, Dict] = {}
    for step in range(args.warmup + args.steps):
        for name, r in runners.items():
            micro = [batch(args, step, r.device)]
            dist.barrier()
            with count_collectives() as log:
                start = time.perf_counter()
                r.train_step(micro)
                elapsed = time.perf_counter() - start
            if step >= args.warmup:
                times[name].append(elapsed)
                comm.setdefault(name, log.summary()["other"])

    model = build_model(args).to(torch.bfloat16)
    split = split_parameters(model, LisaConfig(activated_layers=args.gamma))
    counts = count_params(split)
    del model
    psi_a = {"full": counts.total, "lisa_all": counts.total, "lisa": counts.gamma_active(args.gamma)}
    out_rows = []
    for name, r in runners.items():
        floor = model_state_floor("fsdp2", counts.total, psi_a[name], world)
        # Step times are per rank; the slowest rank sets the pace.
        t = torch.tensor([statistics.median(times[name])], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = dict(r.peak)
        persistent = peak["weights"] + peak["grads"] + peak["master"] + peak["optimizer_state"]
        out_rows.append({"row": name, "psi": counts.total, "psi_active": psi_a[name],
                         "model_state_bytes_per_rank": persistent, **{f"{k}_bytes": v for k, v in peak.items()},
                         "floor_bytes_per_rank": floor["total"], "floor": floor,
                         "median_step_seconds": t.item(), "step_seconds_rank0": times[name],
                         "reduce_scatter_calls_per_step": comm[name]["reduce_scatter"]["calls"],
                         "reduce_scatter_bytes_per_step": comm[name]["reduce_scatter"]["bytes"],
                         "all_gather_calls_per_step": comm[name]["all_gather"]["calls"],
                         "all_gather_bytes_per_step": comm[name]["all_gather"]["bytes"]})
        if name == "lisa":
            out_rows[-1]["switch_seconds"] = [e["seconds"] for e in r.runner.schedule_log[1:]]
    for r in runners.values():
        r.close()
    full = out_rows[0]
    for row in out_rows:
        row["step_time_vs_full"] = row["median_step_seconds"] / full["median_step_seconds"]
        row["model_state_vs_full"] = row["model_state_bytes_per_rank"] / full["model_state_bytes_per_rank"]
    return {**environment(args), "num_layers": args.layers, "rows": out_rows,
            "single_process_frozen_backward_ratio": control}


def markdown(result: Dict) -> str:
    m, v, c = result["machine"], result["versions"], result["config"]

    def mib(b: float) -> str:
        return format_bytes(b, "MiB", 2)  # the tables' one unit
    lines = [
        "# FSDP2: full fine-tuning vs lisa_dist",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['cpus_visible']} CPUs visible, shared), GPU: {m['gpu']}, backend {m['backend']}, "
        f"{m['world_size']} ranks, OMP_NUM_THREADS={m['omp_num_threads']}; {m['platform']}",
        f"Versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}",
        f"Model: Llama, hidden {c['hidden']}, intermediate {c['intermediate']}, {c['layers']} layers, vocab "
        f"{c['vocab']}; {c['batch']} x {c['seq']} tokens per rank per step; "
        f"LISA gamma={c['gamma']}, K={c['interval']}; "
        f"{c['steps']} timed steps per row after {c['warmup']} warm-up, rows interleaved step by step.",
        "",
        "## Model states per rank (measured at the fullest moment of the step vs the analytic floor)",
        "",
        "| row | Psi_a / Psi | weights | grads | fp32 master | moments | total | floor | vs full | "
        "transient fp32 grad copies |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['row']} | {r['psi_active']:,} / {r['psi']:,} | {mib(r['weights_bytes'])} | "
            f"{mib(r['grads_bytes'])} | {mib(r['master_bytes'])} | "
            f"{mib(r['optimizer_state_bytes'])} | {mib(r['model_state_bytes_per_rank'])} | "
            f"{mib(r['floor_bytes_per_rank'])} | {r['model_state_vs_full']:.2f}x | "
            f"{mib(r['transient_fp32_grads_bytes'])} |")
    lines += [
        "",
        "full keeps fp32 sharded weights, which are its masters (4 bytes/param as weights, 0 as master) and "
        "fp32 gradients; the floor assumes bf16 weights + bf16 grads + fp32 master, the same 16 bytes/param. "
        "Moments include AdamW's 4-byte step counter per tensor. Transient fp32 grad copies exist only "
        "inside LisaOptimizer.step() (it hands fp32 gradients to the inner AdamW).",
        "",
        "## Step time and gradient communication per step (per rank)",
        "",
        "| row | median step | vs full | reduce-scatter calls | reduce-scatter bytes | all-gather calls | "
        "all-gather bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['row']} | {r['median_step_seconds'] * 1000:.0f} ms | {r['step_time_vs_full']:.2f}x | "
            f"{r['reduce_scatter_calls_per_step']} | {mib(r['reduce_scatter_bytes_per_step'])} | "
            f"{r['all_gather_calls_per_step']} | {mib(r['all_gather_bytes_per_step'])} |")
    lisa = result["rows"][-1]
    lines += [
        "",
        f"lisa issues {lisa['reduce_scatter_calls_per_step']} reduce-scatters per step: the root unit (embeddings, "
        f"final norm, head) and the {result['config']['gamma']} active layers; the "
        f"{result['num_layers'] - result['config']['gamma']} frozen layers send nothing (full: one per unit, "
        f"{result['rows'][0]['reduce_scatter_calls_per_step']}). Frozen layers are still all-gathered for forward "
        "and backward. Reduce-scatter bytes are the fp32 unsharded gradient buffer each rank puts in, all-gather "
        "bytes the unsharded parameters each rank receives (benchmarks/collective_count.py).",
        "Optimizer step + switch, in the steps that switched (seconds): "
        f"{', '.join(f'{s:.4f}' for s in lisa.get('switch_seconds', []))}.",
        "",
        "Control without FSDP (same model and batch, one process, best of 6): forward+backward with "
        f"{result['config']['gamma']} of {result['num_layers']} layers trainable takes "
        + ", ".join(f"{v:.2f}x ({k})" for k, v in result["single_process_frozen_backward_ratio"].items())
        + " of the time with all trainable. That bounds what skipping frozen layers' weight gradients can "
        "save on this machine's kernels; read the FSDP2 step-time ratio against it.",
        "",
        "CPU numbers: gloo on a shared 2-core machine without bf16 matrix instructions (a bf16 matmul is ~20x "
        "slower than fp32 here, and its input-gradient products dominate), so the step-time ratios are "
        "indicative only and absolute times are not GPU figures.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    owns = init_distributed()
    result = run(args)
    if dist.get_rank() == 0:
        write_report(args.out, result, markdown)
    dist.barrier()
    if owns:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
