"""The dry run's peak against real training steps: what one step adds above what is resident before it.

    # this CPU, every case, fp32; writes benchmarks/results/planner_validation.{json,md}
    PYTHONPATH=. python benchmarks/planner_validation.py
    PYTHONPATH=. python benchmarks/planner_validation.py --cases tiny-single-lisa,smollm2-zero2
    PYTHONPATH=. python benchmarks/planner_validation.py --device cuda --dtype bf16 --name planner_validation_gpu
                                                                       # a GPU node: torch.cuda peaks, bf16

Each case trains a model for three steps on random token ids (micro-batch x sequence, no padding)
with the method as a run trains it: LISA through lisa_dist's own runners (SingleRunner, the
DeepSpeed engine hook, FSDPRunner: what lisa-train builds), LoRA as peft plus AdamW (one process),
deepspeed.initialize over the peft model (ZeRO) or shard_model + AdamW (FSDP2). The interval K is
longer than the run, so the third step trains the same layers as the second and its Adam moments
exist: a steady step. Its rise is measured per rank with host_memory.peak_rise: on a CPU the
peak resident set (VmHWM, reset before the step) above the resident set before it, with every host
allocation of 64 KiB or more in its own mapping (memory.large_host_blocks_mapped) so that freed
tensors leave the resident set and a tiny model's activations are not hidden in glibc's heap; on a
GPU torch.cuda's peak allocated bytes above those allocated before. The prediction is the rise of
`build_plan` (the dry run's own code) for the same model, shape, stage and DeepSpeed config, with
device="cpu" or "cuda" (lisa_dist/recipe/plan_memory.py says what differs).

Multi-rank cases run under torchrun (gloo on CPUs, NCCL on GPUs), this script as the worker.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MEASURE_THRESHOLD = 64 * 1024
"""Host allocations of this size or more get their own mapping while measuring (see the docstring)."""
TOLERANCE = 0.15


@dataclass
class Case:
    name: str
    model: str
    """A lisa-train --model: a preset or a save_pretrained directory ("smollm2-135m" / "gemma3-270m":
    benchmarks/real_assets.py's converted checkpoints)."""
    backend: str
    """single, zero2, zero3 or fsdp2."""
    methods: List[str]
    batch: int
    seq: int
    gradient_checkpointing: bool = False
    nproc: int = 1
    gamma: int = 2
    lora_rank: int = 16
    zero: Dict = field(default_factory=dict)
    """zero_optimization overrides of ds_configs/zero{2,3}.json (buckets sized to the model)."""


SMALL_BUCKETS = {"reduce_bucket_size": 5e6, "allgather_bucket_size": 5e6}
CASES = [
    Case("tiny-single", "tiny-llama", "single", ["full", "lisa", "lora"], batch=4, seq=256),
    Case("tiny-single-gc", "tiny-llama", "single", ["lisa", "lora"], batch=4, seq=256, gradient_checkpointing=True),
    Case("smollm2-single", "smollm2-135m", "single", ["lisa", "lora"], batch=2, seq=256),
    Case("smollm2-single-gc", "smollm2-135m", "single", ["lisa", "lora"], batch=2, seq=512,
         gradient_checkpointing=True),
    Case("gemma3-single", "gemma3-270m", "single", ["lisa", "lora"], batch=1, seq=256),
    Case("smollm2-zero2", "smollm2-135m", "zero2", ["lisa", "lora"], batch=2, seq=256, nproc=2,
         zero=SMALL_BUCKETS),
    Case("smollm2-zero3", "smollm2-135m", "zero3", ["lisa", "lora"], batch=2, seq=256, nproc=2,
         zero={**SMALL_BUCKETS, "stage3_prefetch_bucket_size": 5e6, "stage3_param_persistence_threshold": 0}),
    Case("smollm2-fsdp2", "smollm2-135m", "fsdp2", ["lisa", "lora"], batch=2, seq=256, nproc=2),
]


# ---------------------------------------------------------------------------------------- helpers

def model_path(name: str) -> str:
    """A preset name as it is; a real checkpoint's converted directory (fetched and converted once)."""
    from lisa_dist.recipe import presets

    if name in presets.PRESETS or Path(name).is_dir():
        return name
    from real_assets import checkpoint

    return str(checkpoint(name))


def ds_config(case: Case, dtype: str) -> Dict:
    stage = int(case.backend[-1])
    cfg = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["zero_optimization"].update(case.zero)
    cfg.update(train_micro_batch_size_per_gpu=case.batch, gradient_accumulation_steps=1, steps_per_print=10 ** 9)
    cfg["bf16"] = {"enabled": dtype == "bf16"}
    cfg.pop("scheduler", None)
    return cfg


def predict(case: Case, dtype: str, device: str) -> Dict[str, Dict]:
    """build_plan's per-method estimates for the case, as `lisa-train --dry-run` computes them."""
    from lisa_dist.config import LisaConfig
    from lisa_dist.recipe.plan import build_plan
    from lisa_dist.recipe.run_config import RunConfig

    with tempfile.TemporaryDirectory() as d:
        extra = {}
        if case.backend.startswith("zero"):
            path = Path(d) / "ds.json"
            path.write_text(json.dumps(ds_config(case, dtype)))
            extra = {"backend": "deepspeed", "deepspeed": str(path)}
        else:
            extra = {"backend": case.backend}
        run = RunConfig(model=model_path(case.model), dtype=dtype, batch_size=case.batch, max_length=case.seq,
                        gradient_checkpointing=case.gradient_checkpointing,
                        lisa=LisaConfig(activated_layers=case.gamma, interval_steps=1000),
                        dry_run_lora_rank=case.lora_rank, **extra)
        plan = build_plan(run, {"WORLD_SIZE": str(case.nproc)}, device=device, methods=tuple(case.methods))
    return {m: plan.methods[m].peak.to_dict() for m in case.methods}


# ----------------------------------------------------------------------------------------- worker

def _torch_dtype(dtype: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def _lora(model, rank: int, adapter_fp32: bool):
    import warnings

    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                          lora_dropout=0.0), autocast_adapter_dtype=adapter_fp32)


def _trainer(case: Case, method: str, dtype: str, device):
    """(one training step as a callable, something to close afterwards) for the case's method."""
    import torch

    from lisa_dist.config import LisaConfig
    from lisa_dist.recipe.modeling import build_model_and_tokenizer

    model, _ = build_model_and_tokenizer(model_path(case.model), _torch_dtype(dtype), seed=0)
    model.train()
    if case.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lisa = LisaConfig(activated_layers=case.gamma, interval_steps=1000, seed=0)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1234)

    def batch():
        ids = torch.randint(0, vocab, (case.batch, case.seq), generator=generator)
        return {"input_ids": ids, "labels": ids}

    if case.backend.startswith("zero"):
        cfg = ds_config(case, dtype)
        if method == "lisa":
            from lisa_dist.backends.deepspeed.runner import DeepSpeedRunner
            runner = DeepSpeedRunner(model, lisa, cfg)
            return (lambda: runner.train_step([batch()])), runner.close
        import deepspeed
        lora = _lora(model, case.lora_rank, adapter_fp32=False)
        engine, _, _, _ = deepspeed.initialize(model=lora, config=cfg,
                                               model_parameters=[p for p in lora.parameters() if p.requires_grad])

        def ds_step():
            b = {k: v.to(engine.device) for k, v in batch().items()}
            engine.backward(engine(**b).loss)
            engine.step()
        return ds_step, engine.destroy
    if case.backend == "fsdp2":
        if method == "lisa":
            from lisa_dist.backends.fsdp import FSDPRunner
            runner = FSDPRunner(model, lisa, lr=1e-5)
            return (lambda: runner.train_step([batch()])), runner.close
        from lisa_dist.backends.fsdp.runner import init_distributed
        from lisa_dist.backends.fsdp.shard import shard_model
        init_distributed()
        sharded = shard_model(_lora(model, case.lora_rank, adapter_fp32=False), mp_bf16=dtype == "bf16")
        return _plain_step(sharded, batch, device), (lambda: None)
    if method == "lisa":
        from lisa_dist.backends.single import SingleRunner
        runner = SingleRunner(model.to(device), lisa, lr=1e-5)
        return (lambda: runner.train_step([batch()])), runner.close
    if method == "full":
        full = LisaConfig(activated_layers=len(lisa_layers(model)), interval_steps=1000)
        from lisa_dist.backends.single import SingleRunner
        runner = SingleRunner(model.to(device), full, lr=1e-5)
        return (lambda: runner.train_step([batch()])), runner.close
    return _plain_step(_lora(model, case.lora_rank, adapter_fp32=True).to(device), batch, device), (lambda: None)


def lisa_layers(model):
    from lisa_dist.layers import find_decoder_layers
    return find_decoder_layers(model).layers


def _plain_step(model, batch, device):
    """LoRA's step as a peft user writes it: AdamW over the adapters, clipping as lisa-train does."""
    import torch
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def step():
        b = {k: v.to(device) for k, v in batch().items()}
        loss = model(**b).loss
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(case: Case, method: str, dtype: str) -> List[int]:
    """Train the case for three steps in this process (one rank of it under torchrun) and return every
    rank's measured rise of the third."""
    import gc

    import torch.distributed as dist
    from host_memory import peak_rise

    from lisa_dist.devices import rank_device
    from lisa_dist.memory import large_host_blocks_mapped

    device = rank_device()
    with large_host_blocks_mapped(MEASURE_THRESHOLD):
        step, close = _trainer(case, method, dtype, device)
        step()
        step()
        rise = peak_rise(step, device)
        ranks = [rise]
        if dist.is_initialized():
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, rise)
        close()
    gc.collect()
    return ranks


def worker(case: Case, method: str, dtype: str, out: Path) -> None:
    """measure() in a fresh process; rank 0 writes the result to `out`."""
    import torch.distributed as dist

    from lisa_dist.devices import rank_device

    ranks = measure(case, method, dtype)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.write_text(json.dumps({"rise_per_rank": ranks, "device": str(rank_device())}))
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: Case, method: str, dtype: str, timeout: float = 900) -> Dict:
    """The case's method in fresh processes (one, or torchrun's), so no case inherits another's heap."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        args = [str(Path(__file__).resolve()), "--worker", json.dumps(asdict(case)), "--method", method,
                "--dtype", dtype, "--out", str(out)]
        if case.nproc > 1:
            cmd = [str(Path(sys.executable).with_name("torchrun")), f"--nproc_per_node={case.nproc}",
                   "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", *args]
        else:
            cmd = [sys.executable, *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"{case.name} {method} failed ({proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
    result["seconds"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------- report

def markdown(result: Dict) -> str:
    mib = 1024 ** 2
    lines = [f"# Planner validation: predicted vs measured rise of a training step ({result['device']}, "
             f"{result['dtype']})", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']['cpu']} ({result['machine']['cpus_visible']} cores visible), "
             f"GPU: {result['machine']['gpu']}. Versions: "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
             "", "Rise = what one steady training step holds at its peak above what was resident before it, per "
             "rank (benchmarks/planner_validation.py says how each side is obtained). Predicted: `lisa-train "
             "--dry-run`'s plan (lisa_dist/recipe/plan.py, build_plan) for the same model, shape and config. "
             f"Tolerance {TOLERANCE:.0%}.", "",
             "| case | model | backend x ranks | micro-batch x seq | grad ckpt | method | predicted MiB | measured MiB "
             "(per rank) | measured / predicted | phase |",
             "|---|---|---|---|---|---|---:|---:|---:|---|"]
    failed = [row for row in result["rows"] if "error" in row]
    measured_rows = [row for row in result["rows"] if "error" not in row]
    for row in measured_rows:
        measured = ", ".join(f"{r / mib:.1f}" for r in row["measured"])
        worst = max(row["ratios"], key=lambda r: abs(r - 1))
        ok = "" if abs(worst - 1) <= TOLERANCE else " **over tolerance**"
        lines.append(f"| {row['case']} | {row['model']} | {row['backend']} x {row['nproc']} | {row['batch']} x "
                     f"{row['seq']} | {'on' if row['gradient_checkpointing'] else 'off'} | {row['method']} | "
                     f"{row['predicted_rise'] / mib:.1f} | {measured} | {worst:.3f}{ok} | {row['phase']} |")
    ok = sum(all(abs(r - 1) <= TOLERANCE for r in row["ratios"]) for row in measured_rows)
    lines += ["", f"{ok} of {len(measured_rows)} measured rows within {TOLERANCE:.0%} on every rank."]
    for row in failed:
        lines.append(f"- {row['case']} {row['method']}: the run failed: `{row['error'].splitlines()[-1][:300]}`")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="all", help="comma-separated case names (default: all): "
                   + ", ".join(c.name for c in CASES))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="planner_validation")
    p.add_argument("--merge", action="store_true", help="replace only these cases' rows in an existing OUT/NAME.json "
                   "(the other rows and their command are kept; every command is recorded)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(Case(**json.loads(args.worker)), args.method, args.dtype, Path(args.out))
        return 0
    from bench_common import machine, versions, write_report

    wanted = [c for c in CASES if args.cases == "all" or c.name in args.cases.split(",")]
    rows = []
    for case in wanted:
        predicted = predict(case, args.dtype, args.device)
        for method in case.methods:
            try:
                measured = run_case(case, method, args.dtype)
            except (RuntimeError, subprocess.TimeoutExpired) as e:  # recorded, and the other cases still run
                rows.append({"case": case.name, "model": case.model, "method": method, "error": str(e)[-2000:]})
                print(f"{case.name} {method}: FAILED {str(e)[-500:]}", flush=True)
                continue
            rise = predicted[method]["rise"]
            row = {**asdict(case), "case": case.name, "method": method, "predicted_rise": rise,
                   "predicted": predicted[method], "measured": measured["rise_per_rank"],
                   "ratios": [m / rise for m in measured["rise_per_rank"]], "phase": predicted[method]["phase"],
                   "seconds": measured["seconds"]}
            row.pop("methods")
            rows.append(row)
            print(f"{case.name} {method}: predicted {rise / 2 ** 20:.1f} MiB, measured "
                  f"{[round(m / 2 ** 20, 1) for m in measured['rise_per_rank']]} MiB", flush=True)
    command = "PYTHONPATH=. python " + " ".join(["benchmarks/planner_validation.py", *(argv or sys.argv[1:])])
    result = {"device": args.device, "dtype": args.dtype, "machine": machine(), "versions": versions(),
              "command": command, "tolerance": TOLERANCE, "rows": rows}
    previous = (args.out / args.name).with_suffix(".json")
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        rerun = {c.name for c in wanted}
        result["rows"] = [r for r in old["rows"] if r["case"] not in rerun] + rows
        result["rows"].sort(key=lambda r: [c.name for c in CASES].index(r["case"]))
        result["command"] = old["command"] + "`, then `" + command
    write_report(args.out / args.name, result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
