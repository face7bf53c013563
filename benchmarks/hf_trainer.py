"""LISA inside the Hugging Face Trainer under DeepSpeed: four ways, side by side in one 2-rank run.

    deepspeed --num_gpus 2 benchmarks/hf_trainer.py      # CPU/gloo: writes benchmarks/results/hf_trainer.{json,md}

Rows, for ZeRO-2 and ZeRO-3 (TrainingArguments(deepspeed=...), Trainer's own AdamW with its
decay / no-decay groups, fp32 weights, one tiny Llama from bench_common):
- full: Trainer without any LISA callback (full fine-tuning);
- toggle: an LMFlow / axolotl-style TrainerCallback that flips requires_grad every K steps on the
  engine Trainer already built (the callback runs after `accelerator.prepare`);
- freeze_first: the same callback, but the first active set is frozen in before the engine is
  built (ms-swift's first version): DeepSpeed sees only those layers;
- lisa_dist: `lisa_dist.hf.LisaCallback`.
Every row uses the same schedule (lisa_dist's LayerSampler) and data. Per row: this rank's fp32
master + Adam bytes (lisa_dist.backends.deepspeed.model_state_bytes, mid-interval, the largest of all
ranks), the largest change of a layer outside the active set during a step ("frozen" drift), and
the layers that were sampled at some point but never moved.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import add_model_args, build_model, machine, versions  # noqa: E402
from lisa_dist import LayerSampler, LisaConfig  # noqa: E402
from lisa_dist.integrations.hf import LisaCallback  # noqa: E402
from lisa_dist.layers import split_parameters  # noqa: E402
from lisa_dist.memory import format_bytes  # noqa: E402

VARIANTS = ("full", "toggle", "freeze_first", "lisa_dist")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, seq: int, n: int = 512):
        self.rows = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class Toggle(TrainerCallback):
    """What the LMFlow / axolotl / ms-swift LISA callbacks do: requires_grad on the sampled layers
    only, re-sampled every K steps (here with lisa_dist's sampler so every row trains the same set)."""

    def __init__(self, model, lisa: LisaConfig, freeze_first: bool):
        self.layers = split_parameters(model, lisa).per_layer
        self.sampler = LayerSampler(len(self.layers), lisa)
        self.k = lisa.interval_steps
        if freeze_first:
            self.apply(0)

    def apply(self, switch_index: int) -> None:
        active = self.sampler.active_layers(switch_index)
        for i, layer in enumerate(self.layers):
            for _, p in layer:
                p.requires_grad_(i in active)

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step % self.k == 0:
            self.apply(state.global_step // self.k)


class Measure(TrainerCallback):
    def __init__(self, model, lisa: LisaConfig, trainer_ref):
        self.layers = split_parameters(model, lisa).per_layer
        self.sampler = LayerSampler(len(self.layers), lisa)
        self.k = lisa.interval_steps
        self.trainer_ref = trainer_ref
        self.drift = 0.0
        self.bytes = 0
        self.sampled: set = set()

    def snap(self, i: int) -> List[torch.Tensor]:
        return [(p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone() for _, p in self.layers[i]]

    def on_train_begin(self, args, state, control, **kw):
        # After the engine exists: under ZeRO-3 a rank's copy of a layer is its partition from now on.
        self.start = [self.snap(i) for i in range(len(self.layers))]

    def on_step_begin(self, args, state, control, **kw):
        self.active = set(self.sampler.active_layers(state.global_step // self.k))
        self.sampled |= self.active
        self.before = [self.snap(i) for i in range(len(self.layers))]

    def on_step_end(self, args, state, control, **kw):
        import lisa_dist.backends.deepspeed as lds
        for i in range(len(self.layers)):
            if i not in self.active:
                for a, b in zip(self.snap(i), self.before[i]):
                    if a.numel():
                        self.drift = max(self.drift, (a - b).abs().max().item())
        if state.global_step % self.k:  # mid-interval: every group has its moments
            b = lds.model_state_bytes(self.trainer_ref[0].model_wrapped)
            self.bytes = max(self.bytes, b["fp32_master"] + b["optimizer_state"])

    def never_trained(self) -> List[int]:
        out = []
        for i in sorted(self.sampled):
            moved = any(not torch.equal(a, b) for a, b in zip(self.snap(i), self.start[i]))
            moved_anywhere = torch.tensor([int(moved)])
            dist.all_reduce(moved_anywhere)
            if moved_anywhere.item() == 0:
                out.append(i)
        return out


def ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto", "gradient_clipping": "auto", "steps_per_print": 10 ** 9,
            "bf16": {"enabled": False}, "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}


def run(variant: str, stage: int, args, out: Path) -> Dict:
    model = build_model(args)
    lisa = LisaConfig(activated_layers=args.gamma, interval_steps=args.interval, seed=0)
    trainer_ref: list = []
    measure = Measure(model, lisa, trainer_ref)
    callbacks = [measure]
    if variant == "lisa_dist":
        callbacks.insert(0, LisaCallback(lisa))
    elif variant in ("toggle", "freeze_first"):
        callbacks.insert(0, Toggle(model, lisa, freeze_first=variant == "freeze_first"))
    targs = TrainingArguments(output_dir=str(out / f"{variant}_zero{stage}"), per_device_train_batch_size=args.batch,
                              max_steps=args.steps, learning_rate=1e-3, weight_decay=0.01, max_grad_norm=0.0,
                              logging_steps=10 ** 6, save_strategy="no", report_to=[], use_cpu=True,
                              disable_tqdm=True, optim="adamw_torch", deepspeed=ds_config(stage))
    trainer = Trainer(model=model, args=targs, train_dataset=Tokens(args.vocab, args.seq), callbacks=callbacks)
    trainer_ref.append(trainer)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    peak = torch.tensor([measure.bytes], dtype=torch.int64)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    drift = torch.tensor([measure.drift], dtype=torch.float64)
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    never = measure.never_trained()
    row = {"variant": variant, "stage": stage, "fp32_master_adam_bytes_per_rank": int(peak.item()),
           "frozen_layer_drift": drift.item(), "sampled_layers": sorted(measure.sampled),
           "never_trained": never, "train_seconds": seconds}
    trainer.accelerator.free_memory()
    del trainer, trainer_ref[:]
    return row


def markdown(rows: List[Dict], meta: Dict) -> str:
    lines = ["# HF Trainer + DeepSpeed: LISA callbacks compared", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']['cpu']}, {meta['machine']['cpus_visible']} CPUs visible, "
             f"{meta['world_size']} ranks (gloo). Versions: " +
             ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", "",
             f"Model: {meta['model']}; {meta['steps']} steps, gamma={meta['gamma']}, K={meta['interval']}.", "",
             "| ZeRO | variant | fp32 master + Adam per rank | vs full | max drift of a frozen layer in a step | "
             "sampled layers that never trained |",
             "|---|---|---|---|---|---|"]
    full = {r["stage"]: r["fp32_master_adam_bytes_per_rank"] for r in rows if r["variant"] == "full"}
    names = {"full": "full fine-tuning", "toggle": "toggling callback (LMFlow/axolotl)",
             "freeze_first": "freeze before engine (ms-swift v1)", "lisa_dist": "lisa_dist.hf.LisaCallback"}
    for r in rows:
        b = r["fp32_master_adam_bytes_per_rank"]
        never = "n/a" if r["variant"] == "full" else f"{len(r['never_trained'])} of {len(r['sampled_layers'])}"
        drift = "n/a" if r["variant"] == "full" else f"{r['frozen_layer_drift']:.2e}"
        lines.append(f"| {r['stage']} | {names[r['variant']]} | {format_bytes(b, 'MiB', 2)} | "
                     f"{b / full[r['stage']]:.2f}x | "
                     f"{drift} | {never} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    add_model_args(p)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--stages", default="2,3")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--local_rank", type=int, default=None)
    p.set_defaults(interval=2, seq=32, layers=8)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rows = []
    work = Path("/tmp") / f"lisa_hf_bench_{os.getpid() if dist.get_rank() == 0 else 0}"
    for stage in (int(s) for s in args.stages.split(",")):
        for variant in VARIANTS:
            rows.append(run(variant, stage, args, work))
            if dist.get_rank() == 0:
                print(json.dumps(rows[-1]), flush=True)
    if dist.get_rank() == 0:
        shown = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
        meta = {"command": " ".join(["deepspeed --num_gpus 2 benchmarks/hf_trainer.py", *shown]),
                "machine": machine(), "versions": {**versions(), **_hf_versions()},
                "world_size": dist.get_world_size(), "steps": args.steps, "gamma": args.gamma,
                "interval": args.interval,
                "model": f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, seq {args.seq}, "
                         f"batch {args.batch} per rank, fp32"}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "hf_trainer.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "hf_trainer.md").write_text(markdown(rows, meta))
        print(markdown(rows, meta))
    dist.barrier()
    dist.destroy_process_group()


def _hf_versions() -> Dict:
    from importlib import metadata
    return {k: metadata.version(k) for k in ("accelerate", "trl")}


if __name__ == "__main__":
    main()
