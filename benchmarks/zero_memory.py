"""DeepSpeed ZeRO: full fine-tuning vs naive requires_grad toggling vs lisa_dist, side by side in one run.

    # CPU/gloo: writes benchmarks/results/zero_memory.{json,md,png}
    deepspeed --num_gpus 2 benchmarks/zero_memory.py
    # a GPU node
    deepspeed --num_gpus 8 benchmarks/zero_memory.py --hidden 4096 --intermediate 11008 --layers 32 --vocab 32000

Rows, for each ZeRO stage asked for (--stages: 1, 2, 3, and 1o, 2o, 3o for the stage with
offload_optimizer to the CPU):
- full: deepspeed.initialize over every parameter.
- naive: the same engine, with requires_grad toggled to the LISA schedule every K steps (what the
  LMFlow / axolotl / ms-swift callbacks do): DeepSpeed keeps owning every parameter.
- lisa: lisa_dist.deepspeed.initialize; the ZeRO optimizer is rebuilt over [always-active,
  active layers] at each switch.

Per row: model-state bytes per rank measured from the engine's live tensors (storages counted once;
lisa_dist.backends.deepspeed.model_state_bytes) at the fullest moment (gradients reduced, before the
optimizer step) and between steps, against lisa_dist.memory.model_state_floor; median step time
with the rows' steps interleaved, so load from other processes hits every row alike; for lisa, the
time of each switch and the peak extra resident memory of the process during it (VmHWM after the
switch minus VmRSS before, with the high-water mark reset first: every allocation, not just tensors);
how many "frozen" layers moved anyway.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host_memory import host_rss_bytes, reset_peak_host_rss  # noqa: E402

import lisa_dist.backends.deepspeed as lds  # noqa: E402
from bench_common import add_model_args, build_model, destroy_engine, machine, versions  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.layers import split_parameters  # noqa: E402
from lisa_dist.memory import count_params, format_bytes, model_state_floor  # noqa: E402
from lisa_dist.sampling import LayerSampler  # noqa: E402

ROWS = ("full", "naive", "lisa")
CATEGORIES = ("weights", "grads", "fp32_master", "optimizer_state")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--stages", default="1,2,3,3o", help="comma-separated ZeRO stages; 1o, 2o, 3o: with "
                   "offload_optimizer to the CPU")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results directory")
    p.add_argument("--name", default="zero_memory", help="file stem of the results")
    p.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def ds_config(args, stage: str) -> dict:
    zero = {"stage": int(stage[0]), "reduce_bucket_size": 2e6, "allgather_bucket_size": 2e6,
            "overlap_comm": False, "contiguous_gradients": True}
    if zero["stage"] == 3:
        # 0: partition every parameter; DeepSpeed's 1e5 default would keep all of this small model's
        # parameters whole on every rank, unlike a 7B model where only the norms stay whole.
        zero.update(stage3_prefetch_bucket_size=2e6, stage3_param_persistence_threshold=0)
    if stage.endswith("o"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    return {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
            "steps_per_print": 10 ** 9, "gradient_clipping": 1.0, "bf16": {"enabled": args.dtype == "bf16"},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            # Buckets sized to the model: DeepSpeed's 5e8-element default would dwarf a small model.
            "zero_optimization": zero}


def stage_label(stage: str) -> str:
    return f"ZeRO-{stage[0]}" + (" + CPU optimizer offload" if stage.endswith("o") else "")


def _local(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, else the parameter."""
    return getattr(p, "ds_tensor", p)


class Row:
    """One engine of the comparison, stepped one optimizer step at a time."""

    def __init__(self, args, stage: str, kind: str, lisa: LisaConfig):
        import deepspeed
        self.kind, self.stage, self.args, self.lisa = kind, stage, args, lisa
        model = build_model(args)
        self.split = split_parameters(model, lisa)
        self.sampler = LayerSampler(self.split.num_layers, lisa)
        if kind == "lisa":
            self.engine, _, _, _ = lds.initialize(model=model, config=ds_config(args, stage), lisa=lisa)
        else:
            self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                        config=ds_config(args, stage))
        self.steps = 0
        self.step_seconds: List[float] = []
        self.switch_peak_extra: List[int] = []
        if kind == "lisa":
            switch = self.engine.lisa.switch

            def measured_switch(engine, switch_index):
                reset_peak_host_rss()
                before = host_rss_bytes()
                switch(engine, switch_index)
                self.switch_peak_extra.append(host_rss_bytes("VmHWM") - before)

            self.engine.lisa.switch = measured_switch
        self.frozen_moved = 0
        self.frozen_checked = 0
        if kind == "naive":
            self._toggle(0)

    @property
    def active(self):
        if self.kind == "lisa":
            return self.engine.lisa.active_layers
        if self.kind == "naive":
            return self.sampler.active_layers(self.steps // self.lisa.interval_steps)
        return tuple(range(self.split.num_layers))

    def _toggle(self, k: int) -> None:
        active = set(self.sampler.active_layers(k))
        for i, layer in enumerate(self.split.per_layer):
            for _, p in layer:
                p.requires_grad_(i in active)

    def batch(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step * 1000 + dist.get_rank())
        return torch.randint(0, self.args.vocab, (self.args.batch, self.args.seq), generator=g)

    def forward_backward(self) -> None:
        ids = self.batch(self.steps).to(self.engine.device)
        self.engine.backward(self.engine(input_ids=ids, labels=ids).loss)

    def optimizer_step(self) -> None:
        frozen = [i for i in range(self.split.num_layers) if i not in set(self.active)]
        before = {i: [_local(p).detach().clone() for _, p in self.split.per_layer[i]] for i in frozen}
        self.engine.step()
        self.steps += 1
        for i, snapshot in before.items():
            self.frozen_checked += 1
            self.frozen_moved += any(not torch.equal(_local(p), q)
                                     for (_, p), q in zip(self.split.per_layer[i], snapshot))
        if self.kind == "naive" and self.steps % self.lisa.interval_steps == 0:
            self._toggle(self.steps // self.lisa.interval_steps)

    def timed_step(self) -> None:
        start = time.perf_counter()
        self.forward_backward()
        self.optimizer_step()
        self.step_seconds.append(time.perf_counter() - start)

    def close(self) -> None:
        destroy_engine(self.engine)
        del self.engine


def measure_rows(args, stage: str) -> Dict[str, Dict]:
    n = dist.get_world_size()
    lisa = LisaConfig(activated_layers=args.gamma, interval_steps=args.interval, seed=0)
    rows: Dict[str, Row] = {}
    results: Dict[str, Dict] = {}
    for kind in ROWS:
        try:
            rows[kind] = Row(args, stage, kind, lisa)
        except NotImplementedError as e:
            results[kind] = {"stage": stage, "label": stage_label(stage), "row": kind,
                             "not_implemented": str(e).split(";")[0]}
    # Warm-up, then one untimed step measured at its fullest moment (gradients reduced, Adam state
    # allocated for every group since the warm-up step), then timed steps interleaved across rows.
    for _ in range(args.warmup):
        for row in rows.values():
            row.forward_backward()
            row.optimizer_step()
    in_step = {}
    for kind, row in rows.items():
        row.forward_backward()
        in_step[kind] = lds.model_state_bytes(row.engine)
        row.optimizer_step()
    for _ in range(args.steps):
        for row in rows.values():
            row.timed_step()
    for kind, row in rows.items():
        counts = count_params(row.split)
        psi_a = counts.total if kind != "lisa" else counts.gamma_active(args.gamma)
        weight_bytes = 2 if args.dtype == "bf16" else 4
        floor = model_state_floor(f"zero{stage[0]}", counts.total, psi_a, n, weight_bytes=weight_bytes)
        between = lds.model_state_bytes(row.engine)
        switches = row.engine.lisa.schedule_log[1:] if kind == "lisa" else []
        results[kind] = {
            "stage": stage, "label": stage_label(stage), "row": kind, "psi": counts.total, "psi_active": psi_a,
            "in_step": in_step[kind], "between_steps": between, "floor": floor,
            "median_step_seconds": statistics.median(row.step_seconds),
            "mean_step_seconds": statistics.mean(row.step_seconds),
            "switch_seconds": [e["seconds"] for e in switches],
            "switch_peak_extra_bytes": row.switch_peak_extra,
            "frozen_layer_steps_moved": row.frozen_moved, "frozen_layer_steps_checked": row.frozen_checked,
        }
        row.close()
    rows.clear()
    import gc
    gc.collect()
    full = results["full"]
    for r in results.values():
        if "in_step" in r:
            r["vs_full_model_state"] = r["in_step"]["model_state"] / full["in_step"]["model_state"]
            r["vs_full_step_time"] = r["median_step_seconds"] / full["median_step_seconds"]
            r["vs_floor"] = r["in_step"]["model_state"] / r["floor"]["total"]
    return results


def mib(b: float) -> str:
    return format_bytes(b, "MiB", 2)  # the tables' one unit


def markdown(report: Dict) -> str:
    a = report["config"]
    lines = [
        "# DeepSpeed ZeRO: full fine-tuning vs naive requires_grad toggling vs lisa_dist", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']['cpu']} ({report['machine']['cpus_visible']} CPUs visible, shared), "
        f"GPU: {report['machine']['gpu']}, backend {report['backend']}, {report['world_size']} ranks, "
        f"OMP_NUM_THREADS={report['machine']['omp_num_threads']}; {report['machine']['platform']}",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"Model: Llama, hidden {a['hidden']}, intermediate {a['intermediate']}, {a['layers']} layers, vocab "
        f"{a['vocab']}, {a['dtype']}; {a['batch']} x {a['seq']} tokens per rank per step; LISA gamma={a['gamma']}, "
        f"K={a['interval']}; AdamW, gradient clipping 1.0; {a['steps']} timed steps per row after {a['warmup']} "
        "warm-up, rows interleaved step by step.", "",
        "## Model states per rank (live tensors, at the fullest moment: gradients reduced, before the step)", "",
        "| stage | row | Psi_a / Psi | weights | grads | fp32 master | moments | total | floor | vs floor | vs full | "
        "between steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "not_implemented" in r:
            lines.append(f"| {r['label']} | {r['row']} | not implemented: {r['not_implemented']} |"
                         + " |" * 9)
            continue
        b = r["in_step"]
        grads = b["grads"] + b["grad_partitions"]
        lines.append(f"| {r['label']} | {r['row']} | {r['psi_active']:,} / {r['psi']:,} | {mib(b['weights'])} | "
                     f"{mib(grads)} | {mib(b['fp32_master'])} | {mib(b['optimizer_state'])} | "
                     f"{mib(b['model_state'])} | {mib(r['floor']['total'])} | {r['vs_floor']:.2f}x | "
                     f"{r['vs_full_model_state']:.2f}x | {mib(r['between_steps']['model_state'])} |")
    lines += [
        "",
        "Grads are the gradient tensors held at that moment: parameters' .grad plus ZeRO's reduced partitions. "
        "With contiguous_gradients both stages reduce in the backward hooks and keep only this rank's "
        "partition, so ZeRO-1 measures below its floor, which assumes full-size bf16 gradients (2Psi_a); "
        "naive holds more than full. Reduction buckets (a workspace sized by reduce_bucket_size) are not "
        "model states and are left out; they are in the JSON as comm_buckets. The floor is "
        "docs/design.md#memory-floors: "
        "ZeRO-1 2Psi + 2Psi_a + 12Psi_a/N, ZeRO-2 2Psi + 14Psi_a/N, ZeRO-3 2Psi/N + 14Psi_a/N. Under CPU "
        "optimizer offload the fp32 master, moments and fp32 gradient partitions are the same bytes in host "
        "memory (a CPU run cannot tell the two apart; on a GPU they leave the device); DeepSpeed then also keeps "
        "an fp32 copy of the reduced gradients on the host (each fp32 partition's .grad, 4Psi_a/N), which is why "
        "those rows sit above the floor.", "",
        "## Step time per rank, switch cost, and frozen layers", "",
        "| stage | row | median step | vs full | mean step | switches (median) | median switch / median step | "
        "switch peak extra RSS (max) | frozen layer-steps that moved |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if "not_implemented" in r:
            continue
        sw = r["switch_seconds"]
        sw_text = f"{len(sw)} ({statistics.median(sw) * 1e3:.0f} ms)" if sw else "-"
        ratio = f"{statistics.median(sw) / r['median_step_seconds']:.2f}" if sw else "-"
        peak = r.get("switch_peak_extra_bytes") or []
        peak_text = mib(max(0, max(peak))) if peak else "-"
        lines.append(f"| {r['label']} | {r['row']} | {r['median_step_seconds'] * 1e3:.0f} ms | "
                     f"{r['vs_full_step_time']:.2f}x | {r['mean_step_seconds'] * 1e3:.0f} ms | {sw_text} | {ratio} | "
                     f"{peak_text} | "
                     f"{r['frozen_layer_steps_moved']} / {r['frozen_layer_steps_checked']} |")
    lines += [
        "",
        "A switch (lisa) rebuilds the ZeRO optimizer: it checks rank agreement (one all-gather), frees the old "
        "flat buffers, builds the new ones and carries the always-active group's fp32 master and moments; its "
        "time is included in the mean step, not the median. Under ZeRO-3 the parameter partitioning and its "
        "module hooks stay; the new optimizer gathers each newly trainable parameter once to hook it. "
        "\"Frozen\" layer-steps that moved: under naive "
        "toggling, DeepSpeed still steps parameters whose requires_grad is off (zero-filled gradients, Adam "
        "momentum and weight decay), so frozen layers drift; lisa leaves them bit-identical. Switch peak extra "
        "RSS: the kernel's resident-set counters are batched per thread, so values within about 0.25 MiB of zero "
        "(negative ones in the JSON) are noise: the old buffers are freed before the new ones are allocated, and "
        "the allocator reuses them.", "",
        "CPU numbers: gloo on a shared machine; bf16 matrix products are slow on this CPU, so step-time ratios are "
        "indicative only and absolute times are not GPU figures.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in report["rows"] if "in_step" in r]
    labels = [f"{r['label'].replace('ZeRO-', 'Z').replace(' + CPU optimizer offload', '+off')}\n{r['row']}"
              for r in rows]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(max(12, 1.1 * len(rows)), 4.5))
    bottom = [0.0] * len(rows)
    for cat, key in (("weights", ("weights",)), ("grads", ("grads", "grad_partitions")),
                     ("fp32 master", ("fp32_master",)), ("moments", ("optimizer_state",))):
        values = [sum(r["in_step"][k] for k in key) / 2 ** 20 for r in rows]
        ax_mem.bar(labels, values, bottom=bottom, label=cat)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax_mem.scatter(labels, [r["floor"]["total"] / 2 ** 20 for r in rows], color="black", marker="_", s=600,
                   zorder=3, label="floor (docs/design.md)")
    ax_mem.set_ylabel("MiB per rank")
    ax_mem.set_title("Model states per rank (in-step peak)")
    ax_mem.set_ylim(0, 1.35 * max(bottom))  # room for the legend above the bars
    ax_mem.legend(fontsize=8, ncol=3, loc="upper center")
    for ax in (ax_mem, ax_time):
        ax.tick_params(axis="x", labelsize=8)
    ax_time.bar(labels, [r["median_step_seconds"] * 1e3 for r in rows], color="tab:gray")
    ax_time.set_ylabel("ms")
    ax_time.set_title("Median step time per rank")
    cfg = report["config"]
    fig.suptitle(f"{report['world_size']} ranks, {report['machine']['gpu'] or 'CPU/gloo'}; Llama {cfg['layers']}x"
                 f"{cfg['hidden']}, gamma={cfg['gamma']}, K={cfg['interval']}, {cfg['dtype']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows: List[Dict] = []
    for stage in (s.strip() for s in args.stages.split(",") if s.strip()):
        if stage not in ("1", "2", "3", "1o", "2o", "3o"):
            raise SystemExit(f"--stages: unknown stage {stage!r}; use 1, 2, 3, or 1o, 2o, 3o for optimizer offload")
        results = measure_rows(args, stage)
        rows.extend(results[kind] for kind in ROWS if kind in results)
        if rank == 0:
            print(f"{stage_label(stage)}: " + ", ".join(
                f"{r['row']} {mib(r['in_step']['model_state'])} {r['median_step_seconds'] * 1e3:.0f} ms"
                for r in results.values() if "in_step" in r), flush=True)
    if rank == 0:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "local_rank"}
        flags = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--local_rank"))
        report = {"command": f"deepspeed --num_gpus {world} benchmarks/zero_memory.py {flags}".strip(),
                  "machine": machine(), "versions": versions(), "backend": dist.get_backend(), "world_size": world,
                  "config": config, "rows": rows}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
        (args.out / f"{args.name}.md").write_text(markdown(report))
        plot(report, args.out / f"{args.name}.png")
        print(f"wrote {args.out / args.name}.{{json,md,png}}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
