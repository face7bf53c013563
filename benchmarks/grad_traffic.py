"""Gradient communication per optimizer step: full fine-tuning vs lisa_dist, ZeRO-1/2/3 and FSDP2, in one launch.

    # CPU/gloo: writes benchmarks/results/grad_traffic.{json,md}
    deepspeed --num_gpus 2 benchmarks/grad_traffic.py
    deepspeed --num_gpus 8 benchmarks/grad_traffic.py --hidden 4096 --intermediate 11008 --layers 32 --vocab 32000

Every collective of one steady-state optimizer step (after --warmup steps, no switch inside it) is
counted at the process-group level (benchmarks/collective_count.py: sees DeepSpeed's bound
all-gather / reduce-scatter functions, its reduce / all-reduce buckets and FSDP2's calls alike), by
phase (forward, backward, step) and op type. Gradient bytes are the reductions (all-reduce, reduce,
reduce-scatter) issued in the backward pass, where ZeRO and FSDP2 reduce gradients; the step's
reductions are the gradient-norm and overflow scalars, reported apart. FSDP2 runs forward, backward
and step inside one runner call, so all its collectives are in one phase: its gradient bytes are
the reduce-scatters, and its other reductions (scalars) are reported apart. The goal checked:
lisa's gradient bytes <= 1.05 x full's x Psi_a / Psi, and equal to the bytes of the active set's
gradients (frozen layers send none).

FSDP2 runs in the process group deepspeed.init_distributed made (plain gloo/NCCL), so one launch
covers both engine families.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lisa_dist.backends.deepspeed as lds  # noqa: E402
from bench_common import add_model_args, build_model, machine, versions  # noqa: E402
from collective_count import REDUCTIONS, count_collectives  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.layers import split_parameters  # noqa: E402
from lisa_dist.memory import count_params, format_bytes  # noqa: E402

GOAL = 1.05
ENGINES = ("zero1", "zero2", "zero3", "fsdp2")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.set_defaults(interval=100)  # K > warm-up + 1: the counted step has no switch
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results directory")
    p.add_argument("--name", default="grad_traffic", help="file stem of the results")
    p.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def ds_config(args, stage: int) -> dict:
    zero = {"stage": stage, "reduce_bucket_size": 2e6, "allgather_bucket_size": 2e6,
            "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        # partition every parameter (DeepSpeed's 1e5 default keeps a small model's params whole)
        zero.update(stage3_prefetch_bucket_size=2e6, stage3_param_persistence_threshold=0)
    return {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
            "steps_per_print": 10 ** 9, "gradient_clipping": 1.0, "bf16": {"enabled": args.dtype == "bf16"},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "zero_optimization": zero}


def batch(args, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step * 1000 + dist.get_rank())
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)


def trainable_grad_bytes(model, grad_itemsize: int) -> int:
    """Bytes of the gradients of the parameters being trained now (ZeRO-3: full sizes)."""
    return sum((getattr(p, "ds_numel", None) or p.numel()) * grad_itemsize
               for p in model.parameters() if p.requires_grad)


def deepspeed_row(args, stage: int, kind: str, lisa: LisaConfig) -> Dict:
    import deepspeed
    model = build_model(args)
    if kind == "lisa":
        engine, _, _, _ = lds.initialize(model=model, config=ds_config(args, stage), lisa=lisa)
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=ds_config(args, stage))
    for step in range(args.warmup + 1):
        ids = batch(args, step).to(engine.device)
        dist.barrier()
        with count_collectives(deepspeed_shm=True) as log:
            with log.in_phase("forward"):
                loss = engine(input_ids=ids, labels=ids).loss
            with log.in_phase("backward"):
                engine.backward(loss)
            with log.in_phase("step"):
                engine.step()
    switches = len(engine.lisa.schedule_log) if kind == "lisa" else 0
    comm_dtype = _reduction_dtype(log)
    expected = trainable_grad_bytes(engine.module, torch.empty(0, dtype=comm_dtype).element_size())
    row = {"engine": f"zero{stage}", "row": kind, "comm": log.summary(),
           "grad_bytes": log.bytes(REDUCTIONS, ("backward",)),
           "step_reduction_bytes": log.bytes(REDUCTIONS, ("step",)),
           "param_all_gather_bytes": log.bytes(("all_gather",)),
           "trainable_grad_bytes": expected, "grad_dtype": str(comm_dtype).replace("torch.", ""),
           "switches_before_counted_step": switches}
    engine.destroy()
    engine.optimizer = None
    if kind == "lisa":
        engine.lisa = None
    del engine, model, loss
    gc.collect()
    return row


def _reduction_dtype(log) -> torch.dtype:
    """The dtype that carries most of the backward pass's reduced bytes: the gradients' (a scalar
    reduced in another dtype, if any, does not change it)."""
    by_dtype: Dict[str, int] = {}
    for op in REDUCTIONS:
        entry = log.calls.get("backward", {}).get(op)
        if entry and len(entry["dtypes"]) == 1:
            (dtype,) = entry["dtypes"]
            by_dtype[dtype] = by_dtype.get(dtype, 0) + entry["bytes"]
    assert by_dtype, f"no single-dtype gradient reduction in the backward pass: {log.summary()}"
    return getattr(torch, max(by_dtype, key=by_dtype.get))


def fsdp2_row(args, kind: str, lisa: LisaConfig) -> Dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lisa_dist.backends.fsdp import FSDPRunner

    weight_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if kind == "lisa":
        runner = FSDPRunner(build_model(args).to(weight_dtype), lisa, lr=1e-4, max_grad_norm=0.0)
        model, device = runner.model, runner.device
    else:
        # What an FSDP2 user writes for full fine-tuning: fp32 sharded params (the masters), bf16
        # compute, fp32 gradient reduction (benchmarks/fsdp2_memory.py's baseline).
        runner = None
        from lisa_dist.backends.fsdp.shard import default_device
        device = default_device()
        model = build_model(args).to(torch.float32)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=weight_dtype, reduce_dtype=torch.float32)
        for i, layer in enumerate(model.model.layers):
            fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(model.model.layers) - 1)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    # Inline, not a closure over `model`: the `del model` below (which frees it before gc.collect())
    # would leave such a closure naming a deleted variable.
    for step in range(args.warmup + 1):
        ids = batch(args, step).to(device)
        dist.barrier()
        with count_collectives() as log:
            with log.in_phase("step"):
                micro = [{"input_ids": ids, "labels": ids}]
                if runner is not None:
                    runner.train_step(micro)
                else:
                    for b in micro:
                        model(**b).loss.backward()
                    opt.step()
                    opt.zero_grad()
    rs = log.calls.get("step", {}).get("reduce_scatter", {"calls": 0})
    row = {"engine": "fsdp2", "row": kind, "comm": log.summary(),
           # the reduce-scatters are the gradients; anything else reduced (LisaOptimizer's scalars) is reported apart
           "grad_bytes": log.bytes(("reduce_scatter",)), "step_reduction_bytes": log.bytes(("all_reduce", "reduce")),
           "param_all_gather_bytes": log.bytes(("all_gather",)),
           "trainable_grad_bytes": sum(p.numel() * 4 for p in model.parameters() if p.requires_grad),
           "grad_dtype": "float32", "reduce_scatter_calls": rs["calls"]}
    if runner is not None:
        row["active_layers"] = (list(runner.optimizer.active_layers)
                                if hasattr(runner.optimizer, "active_layers") else None)
        runner.close()
    else:
        del opt
    del model
    gc.collect()
    return row


def measure(args) -> List[Dict]:
    lisa = LisaConfig(activated_layers=args.gamma, interval_steps=args.interval, seed=0)
    counts = count_params(split_parameters(build_model(args), lisa))
    psi, psi_a = counts.total, counts.gamma_active(args.gamma)
    rows: List[Dict] = []
    for engine in (e.strip() for e in args.engines.split(",") if e.strip()):
        if engine not in ENGINES:
            raise SystemExit(f"--engines: unknown engine {engine!r}; use a subset of {', '.join(ENGINES)}")
        pair = {kind: (deepspeed_row(args, int(engine[-1]), kind, lisa) if engine != "fsdp2"
                       else fsdp2_row(args, kind, lisa)) for kind in ("full", "lisa")}
        full, lisa_row = pair["full"], pair["lisa"]
        for r in pair.values():
            r.update(psi=psi, psi_active=psi if r["row"] == "full" else psi_a)
        budget = full["grad_bytes"] * psi_a / psi
        # one rank: FSDP2 issues no reduce-scatter at all, so there is nothing to compare
        lisa_row.update(goal_bytes=GOAL * budget,
                        vs_full_times_share=lisa_row["grad_bytes"] / budget if budget else None,
                        vs_full=lisa_row["grad_bytes"] / full["grad_bytes"] if budget else None,
                        all_gather_vs_full=lisa_row["param_all_gather_bytes"] / max(1, full["param_all_gather_bytes"]),
                        meets_goal=lisa_row["grad_bytes"] <= GOAL * budget)
        rows += [full, lisa_row]
        if dist.get_rank() == 0:
            print(f"{engine}: grad bytes full {full['grad_bytes']:,} lisa {lisa_row['grad_bytes']:,} "
                  f"({lisa_row['vs_full_times_share'] or 0:.4f}x of full x Psi_a/Psi)", flush=True)
    return rows


def markdown(report: Dict) -> str:
    a = report["config"]
    lines = [
        "# Gradient communication per optimizer step: full fine-tuning vs lisa_dist", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['cpus_visible']} CPUs visible, shared), GPU: "
        f"{report['machine']['gpu']}, backend {report['backend']}, {report['world_size']} ranks; "
        f"{report['machine']['platform']}",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"Model: Llama, hidden {a['hidden']}, intermediate {a['intermediate']}, {a['layers']} layers, vocab "
        f"{a['vocab']}, {a['dtype']} weights; {a['batch']} x {a['seq']} tokens per rank; LISA gamma={a['gamma']} "
        f"(Psi_a / Psi = {report['psi_active']:,} / {report['psi']:,} = {report['psi_active'] / report['psi']:.4f}); "
        f"one step counted after {a['warmup']} warm-up steps, no switch inside it.", "",
        "| engine | row | gradient reductions (bytes, calls by op) | grad dtype | of the trainable grads | "
        "lisa / (full x Psi_a/Psi) | goal <= 1.05 | param all-gathers | step scalars |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        phase, grad_ops = ("step", ("reduce_scatter",)) if r["engine"] == "fsdp2" else ("backward", REDUCTIONS)
        ops = ", ".join(f"{op} x{e['calls']}" for op, e in r["comm"].get(phase, {}).items() if op in grad_ops)
        ratio = f"{r['vs_full_times_share']:.4f}x" if r["row"] == "lisa" and r["vs_full_times_share"] else "-"
        goal = ("yes" if r["meets_goal"] else "NO") if r["row"] == "lisa" else "-"
        lines.append(f"| {r['engine']} | {r['row']} | {format_bytes(r['grad_bytes'], 'MiB', 3)} ({ops}) | "
                     f"{r['grad_dtype']} | "
                     f"{r['grad_bytes'] / max(1, r['trainable_grad_bytes']):.4f}x | {ratio} | {goal} | "
                     f"{format_bytes(r['param_all_gather_bytes'], 'MiB', 3)} | {r['step_reduction_bytes']} B |")
    lines += [
        "",
        "Bytes are logical tensor sizes per rank (the tensor of an all-reduce or reduce, the unsharded input of "
        "a reduce-scatter, the unsharded output of an all-gather), counted at the ProcessGroup methods; on the "
        "wire a ring moves about (N-1)/N of that per rank, twice for an all-reduce. \"Of the trainable grads\": "
        "gradient bytes over (trainable parameters x grad dtype size); 1.0000x means every byte reduced is a "
        "trainable gradient, so frozen layers send nothing. ZeRO-1/2 all-reduce each bucket slice (DeepSpeed's "
        "default `use_multi_rank_bucket_allreduce`; off, each slice is reduced to its owner); ZeRO-3 and FSDP2 "
        "reduce-scatter, FSDP2 one call per unit with a gradient (frozen units issue none). Parameter "
        "all-gathers: ZeRO-1/2 gather the updated partitions of what the optimizer owns after the step; ZeRO-3 "
        "and FSDP2 gather every layer, frozen ones too, for forward and backward, so those do not shrink with "
        "LISA. Step scalars: the gradient-norm and overflow all-reduces inside engine.step() "
        "(FSDP2: LisaOptimizer's own scalar all-reduce).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from lisa_dist.backends.deepspeed.process_group import release_shm_segments
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    release_shm_segments()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = measure(args)
    rank, world = dist.get_rank(), dist.get_world_size()
    report_rows = [None] * world
    dist.all_gather_object(report_rows, rows)
    if rank == 0:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "local_rank"}
        flags = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--local_rank"))
        report = {"command": f"deepspeed --num_gpus {world} benchmarks/grad_traffic.py {flags}".strip(),
                  "machine": machine(), "versions": versions(), "backend": dist.get_backend(), "world_size": world,
                  "config": config, "psi": rows[0]["psi"], "psi_active": rows[1]["psi_active"], "goal": GOAL,
                  "rows": rows, "rows_by_rank": report_rows}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
        (args.out / f"{args.name}.md").write_text(markdown(report))
        print(f"wrote {args.out / args.name}.{{json,md}}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
