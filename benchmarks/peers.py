"""lisa_dist beside what users would pick instead, one run per engine, same model and data.

    flock /tmp/lisa_cpu.lock python benchmarks/peers.py            # writes benchmarks/results/peers.{json,md,png}
    python benchmarks/peers.py --smoke --out /tmp/peers     # tiny model, 2 steps (tests/distributed/test_peers.py)

Engines: single process (plain torch), DeepSpeed ZeRO-2 and ZeRO-3, FSDP2; the distributed ones run
with 2 ranks in one `deepspeed --num_gpus 2` launch of this script (--worker), one engine after the
other. Methods, each on a freshly built copy of the same fp32 Llama and the same token batches:
- full: AdamW over every parameter.
- lora_r8, lora_r64: peft LoRA on all linear layers (peft's "all-linear": every projection of every
  decoder layer, not the LM head), handed to the engine as a normal model (deepspeed.initialize over
  its trainable parameters, fully_shard per decoder layer + root).
- naive: what LMFlow's DynamicLayerActivationCallback does: the optimizer / engine is built over
  every parameter, then every K steps all decoder layers get requires_grad=False and gamma sampled
  ones True (embeddings and head stay trainable). Same schedule as lisa.
- lisa, lisa_no_emb: lisa_dist (SingleRunner, lisa_dist.deepspeed.initialize, FSDPRunner), by
  default and with train_embeddings=False.

Per rank: model-state bytes (weights + gradients + fp32 masters + optimizer state, from the live
tensors, at the fullest moment of one extra untimed step: gradients present, optimizer state
allocated), the process's host RSS peak over the method (built, warmed up, stepped), median step
time (forward + backward + clipping + optimizer step) and tokens/s. Methods run one after the other
(not interleaved) so each one's RSS peak is its own. Beside each time: the compute floor (see
`compute_fraction`).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from host_memory import host_rss_bytes, reset_peak_host_rss  # noqa: E402

from bench_common import (  # noqa: E402
    add_model_args,
    build_model,
    destroy_engine,
    free_port,
    launcher,
    machine,
    optimizer_state_bytes,
    subset,
    versions,
)
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.layers import split_parameters  # noqa: E402
from lisa_dist.memory import count_params, format_bytes, local_tensor_bytes  # noqa: E402
from lisa_dist.sampling import LayerSampler  # noqa: E402

ENGINES = ("single", "zero2", "zero3", "fsdp2")
DIST_ENGINES = ENGINES[1:]
METHODS = ("full", "lora_r8", "lora_r64", "naive", "lisa", "lisa_no_emb")
ENGINE_LABELS = {"single": "single process", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp2": "FSDP2"}
SMOKE = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=256, seq=32, batch=1,
             steps=2, warmup=1, interval=2)
LR = 1e-4
MAX_GRAD_NORM = 1.0
# Flags forwarded to the --worker launch (everything that shapes a row).
FORWARDED = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "seq", "batch", "gamma",
             "interval", "warmup", "steps")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    # Large enough that matrix products, not Python and launch overhead, set the step time on a CPU
    # core: a full fine-tuning step is ~90% forward + backward here.
    p.set_defaults(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8, vocab=8192, seq=256, batch=2,
                   gamma=2, interval=4, warmup=2)
    p.add_argument("--steps", type=int, default=6, help="timed steps per method, after --warmup")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {ENGINES}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 timed steps (overrides the shape flags: "
                   + ", ".join(f"{k}={v}" for k, v in SMOKE.items()) + ")")
    p.add_argument("--nproc", type=int, default=2, help="ranks of the distributed engines")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results directory")
    p.add_argument("--name", default="peers", help="file stem of the results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    args.engine_list = subset(args.engines, ENGINES, "--engines")
    args.method_list = subset(args.methods, METHODS, "--methods")
    return args


# --- the methods' common parts ------------------------------------------------------------------

def lisa_config(args, method: str) -> LisaConfig:
    # benchmarks/real_models.py runs several seeds through NaiveToggle; this benchmark has one.
    return LisaConfig(activated_layers=args.gamma, interval_steps=args.interval, seed=getattr(args, "seed", 0),
                      train_embeddings=method != "lisa_no_emb")


def lora_model(model: torch.nn.Module, method: str) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    r = int(method.split("_r")[1])
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear"))


class NaiveToggle:
    """LMFlow's DynamicLayerActivationCallback on any engine: every K optimizer steps, freeze every
    decoder layer and unfreeze gamma sampled ones, touching requires_grad only."""

    def __init__(self, model: torch.nn.Module, args):
        self.split = split_parameters(model, lisa_config(args, "naive"))
        self.sampler = LayerSampler(self.split.num_layers, lisa_config(args, "naive"))
        self.interval = args.interval
        self.toggle(0)

    def after_step(self, steps_done: int) -> None:
        if steps_done % self.interval == 0:
            self.toggle(steps_done // self.interval)

    def toggle(self, k: int) -> None:
        active = set(self.sampler.active_layers(k))
        for i, layer in enumerate(self.split.per_layer):
            for _, p in layer:
                p.requires_grad_(i in active)


def trainable_count(model: torch.nn.Module, args, method: str) -> int:
    if method.startswith("lora"):
        # ZeRO-3 partitions parameters in place (numel() == 0); ds_numel is the full size.
        return sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters() if p.requires_grad)
    counts = count_params(split_parameters(model, lisa_config(args, method)))
    return counts.gamma_active(args.gamma) if method.startswith("lisa") else counts.total


def batch(args, step: int, rank: int) -> Dict[str, torch.Tensor]:
    """The same token batches for every method: step s on rank r is the same tensor in every row."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def local_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """Model states of a plain torch / FSDP2 optimizer, or a LisaOptimizer, from the live tensors."""
    from lisa_dist.optim import LisaOptimizer
    params = list(model.parameters())
    if isinstance(optimizer, LisaOptimizer):
        b = optimizer.state_bytes()
        master, state = b["master"], b["optimizer_state"]
    else:
        state = optimizer_state_bytes(optimizer, model)  # fp32 weights are their own masters
        master = 0
    return {"weights": local_tensor_bytes(params),
            "grads": local_tensor_bytes([p.grad for p in params if p.grad is not None]),
            "master": master, "optimizer_state": state}


class TorchRow:
    """A method on a plain torch optimizer (single process or FSDP2): forward, backward, clip, step."""

    def __init__(self, model, optimizer, after_step: Optional[Callable[[int], None]] = None):
        self.model, self.optimizer, self.after_step = model, optimizer, after_step
        self.steps = 0
        self.state: Dict[str, int] = {}
        self.measure = False
        optimizer.register_step_post_hook(lambda *_: self._measure())

    def _measure(self) -> None:
        if self.measure:
            self.state = local_state_bytes(self.model, self.optimizer)

    def step(self, b: Dict[str, torch.Tensor]) -> None:
        self.model(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.after_step is not None:
            self.after_step(self.steps)

    def close(self) -> None:
        del self.model, self.optimizer


class RunnerRow:
    """lisa_dist's SingleRunner / FSDPRunner; measured by a hook on the inner optimizer's step."""

    def __init__(self, runner):
        self.runner = runner
        self.state: Dict[str, int] = {}
        self.measure = False
        runner.optimizer._inner.register_step_post_hook(lambda *_: self._measure())

    def _measure(self) -> None:
        if self.measure:
            self.state = local_state_bytes(self.runner.model, self.runner.optimizer)

    def step(self, b: Dict[str, torch.Tensor]) -> None:
        self.runner.train_step([b])

    def close(self) -> None:
        self.runner.close()


class DeepSpeedRow:
    """A DeepSpeed engine (plain or lisa_dist's); model states measured after backward, before step."""

    def __init__(self, engine, toggle: Optional[NaiveToggle] = None):
        self.engine, self.toggle = engine, toggle
        self.steps = 0
        self.state: Dict[str, int] = {}
        self.measure = False

    def step(self, b: Dict[str, torch.Tensor]) -> float:
        """One optimizer step; returns this rank's loss."""
        import lisa_dist.backends.deepspeed as lds
        b = {k: v.to(self.engine.device) for k, v in b.items()}
        loss = self.engine(**b).loss
        self.engine.backward(loss)
        if self.measure:
            s = lds.model_state_bytes(self.engine)
            self.state = {"weights": s["weights"], "grads": s["grads"] + s["grad_partitions"],
                          "master": s["fp32_master"], "optimizer_state": s["optimizer_state"]}
        self.engine.step()
        self.steps += 1
        if self.toggle is not None:
            self.toggle.after_step(self.steps)
        return loss.item()

    def close(self) -> None:
        destroy_engine(self.engine)
        del self.engine


# --- building a method on an engine -------------------------------------------------------------

def build_single(args, method: str):
    from lisa_dist.backends.single import SingleRunner
    model = build_model(args)
    if method.startswith("lisa"):
        return RunnerRow(SingleRunner(model, lisa_config(args, method), lr=LR, max_grad_norm=MAX_GRAD_NORM)), model
    if method.startswith("lora"):
        model = lora_model(model, method)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    # Like LMFlow's callback: the optimizer is built first, over everything that requires grad.
    toggle = NaiveToggle(model, args) if method == "naive" else None
    return TorchRow(model, opt, toggle.after_step if toggle else None), model


def build_fsdp2(args, method: str):
    from lisa_dist.backends.fsdp import FSDPRunner
    from lisa_dist.backends.fsdp.shard import shard_model
    model = build_model(args)
    if method.startswith("lisa"):
        return RunnerRow(FSDPRunner(model, lisa_config(args, method), lr=LR, max_grad_norm=MAX_GRAD_NORM)), model
    layers_path = None
    if method.startswith("lora"):
        model = lora_model(model, method)
        layers_path = "base_model.model.model.layers"
    shard_model(model, mp_bf16=False, reduce_fp32=True, layers_path=layers_path)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    toggle = NaiveToggle(model, args) if method == "naive" else None
    return TorchRow(model, opt, toggle.after_step if toggle else None), model


def build_zero(args, method: str, stage: int):
    import deepspeed
    from zero_memory import ds_config  # the ZeRO benchmark's config, so the two benchmarks compare

    import lisa_dist.backends.deepspeed as lds
    config = ds_config(SimpleNamespace(batch=args.batch, dtype="fp32"), str(stage))
    config["gradient_clipping"] = MAX_GRAD_NORM
    model = build_model(args)
    if method.startswith("lisa"):
        engine, _, _, _ = lds.initialize(model=model, config=config, lisa=lisa_config(args, method))
        return DeepSpeedRow(engine), model
    if method.startswith("lora"):
        model = lora_model(model, method)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    # After initialize, like LMFlow's callback under Trainer: ZeRO drops parameters that do not
    # require grad when it builds its partitions, so toggling first would be a different method.
    toggle = NaiveToggle(model, args) if method == "naive" else None
    return DeepSpeedRow(engine, toggle), model


def build(args, engine: str, method: str):
    if engine == "single":
        return build_single(args, method)
    if engine == "fsdp2":
        return build_fsdp2(args, method)
    return build_zero(args, method, int(engine[-1]))


def run_method(args, engine: str, method: str, rank: int, world: int) -> Dict:
    """Build, warm up, time, then measure one extra step at its fullest moment; per-rank numbers."""
    import torch.distributed as dist
    distributed = engine != "single"
    gc.collect()
    _return_freed_memory()
    reset_peak_host_rss()
    rss_start = host_rss_bytes()
    row, model = build(args, engine, method)
    trainable = trainable_count(model, args, method)
    del model
    times: List[float] = []
    total = args.warmup + args.steps
    for step in range(total + 1):
        b = batch(args, step, rank)
        row.measure = step == total
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        row.step(b)
        if step >= args.warmup and step < total:
            times.append(time.perf_counter() - start)
    state = dict(row.state)
    state["total"] = sum(state.values())
    peak = host_rss_bytes("VmHWM")
    row.close()
    del row
    gc.collect()
    out = {"engine": engine, "method": method, "trainable_params": trainable,
           "model_state_bytes": state, "peak_rss_bytes": peak, "peak_rss_over_start_bytes": peak - rss_start,
           "step_seconds": times, "median_step_seconds": statistics.median(times)}
    if not distributed:
        return {**out, "ranks": [out.copy()]}
    ranks: List[Optional[Dict]] = [None] * world
    dist.all_gather_object(ranks, out)
    # The slowest rank sets the pace; memory is reported per rank (and its maximum).
    return {**out, "median_step_seconds": max(r["median_step_seconds"] for r in ranks),
            "model_state_bytes": max((r["model_state_bytes"] for r in ranks), key=lambda s: s["total"]),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
            "peak_rss_over_start_bytes": max(r["peak_rss_over_start_bytes"] for r in ranks), "ranks": ranks}


def _return_freed_memory() -> None:
    """Hand memory that earlier methods freed back to the kernel (glibc keeps freed heap pages
    mapped), so each method's RSS peak starts from what is really in use."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peaks then include earlier methods' leftovers
        pass


def run_engine(args, engine: str, rank: int = 0, world: int = 1) -> List[Dict]:
    rows = []
    for method in args.method_list:
        row = run_method(args, engine, method, rank, world)
        row["world_size"] = world
        row["tokens_per_second"] = world * args.batch * args.seq / row["median_step_seconds"]
        rows.append(row)
        if rank == 0:
            print(f"{ENGINE_LABELS[engine]} {method}: model states "
                  f"{format_bytes(row['model_state_bytes']['total'], 'MiB', 1)}/rank, peak RSS "
                  f"{format_bytes(row['peak_rss_bytes'], 'MiB', 0)}, "
                  f"{row['median_step_seconds'] * 1e3:.0f} ms/step", flush=True)
    return rows


# --- the compute floor --------------------------------------------------------------------------

def forward_flops(args) -> Dict[str, float]:
    """Forward matmul FLOPs per token: each decoder layer (its projections plus attention scores and
    weighted sum, 4 * seq * hidden, causal mask ignored) and the LM head; embeddings are a lookup."""
    head_dim = args.hidden // args.heads
    proj = (2 * args.hidden * args.hidden + 2 * args.hidden * args.kv_heads * head_dim  # q, o; k, v
            + 3 * args.hidden * args.intermediate)  # gate, up, down
    return {"layer": 2 * proj + 4 * args.seq * args.hidden, "head": 2 * args.hidden * args.vocab}


def compute_fraction(args, method: str, active: Sequence[int]) -> float:
    """Compute of one step relative to full fine-tuning's, from forward FLOPs F per part.

    Full fine-tuning costs 3F per part (forward, input-gradient and weight-gradient products). A
    trained part costs 3F; a frozen part that backward passes through costs 2F (forward + input
    gradient); a frozen part below everything that trains costs F (forward only): with frozen
    embeddings (lisa_no_emb) the backward stops at the lowest active layer. LoRA: every base
    weight is frozen but every layer has adapters, so 2F everywhere (the adapters' own products
    and the optimizer step are left out)."""
    f = forward_flops(args)
    full = 3 * (args.layers * f["layer"] + f["head"])
    if method == "full":
        return 1.0
    if method.startswith("lora"):
        return 2 * (args.layers * f["layer"] + f["head"]) / full
    lowest = min(active) if method == "lisa_no_emb" else 0
    cost = 3 * f["head"]
    for i in range(args.layers):
        cost += f["layer"] * (3 if i in active else 2 if i > lowest else 1)
    return cost / full


def add_floors(args, rows: List[Dict]) -> None:
    """floor = what the step's compute alone costs one rank: the single-process full fine-tuning
    median step time (the same batch per rank, one thread, no communication; the engine's own full
    fine-tuning when the single engine was not run) x the mean compute fraction over the timed
    steps' active sets (step s trains the layers of interval s // K)."""
    full = {r["engine"]: r for r in rows if r["method"] == "full"}
    sampler = LayerSampler(args.layers, lisa_config(args, "lisa"))
    timed = range(args.warmup, args.warmup + args.steps)
    for r in rows:
        basis = full.get("single", full.get(r["engine"]))
        if basis is None or basis is r:
            continue
        fractions = [compute_fraction(args, r["method"], sampler.active_layers(s // args.interval)) for s in timed]
        r["compute_fraction"] = statistics.mean(fractions)
        r["compute_floor_basis"] = f"{basis['engine']} full"
        r["compute_floor_seconds"] = r["compute_fraction"] * basis["median_step_seconds"]
        r["vs_floor"] = r["median_step_seconds"] / r["compute_floor_seconds"]
    for r in rows:
        f = full.get(r["engine"])
        if f is not None:
            r["model_state_vs_full"] = r["model_state_bytes"]["total"] / f["model_state_bytes"]["total"]
            r["step_time_vs_full"] = r["median_step_seconds"] / f["median_step_seconds"]


# --- processes ----------------------------------------------------------------------------------

def worker(args) -> None:
    """One rank of the distributed engines (launched by `main` with the deepspeed launcher)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from lisa_dist.backends.deepspeed.process_group import release_shm_segments
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    release_shm_segments()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for engine in args.engine_list:
        rows += run_engine(args, engine, rank, world)
    if rank == 0:
        args.result_file.write_text(json.dumps({"backend": dist.get_backend(), "rows": rows}))
    dist.barrier()
    dist.destroy_process_group()


def launch_workers(args, engines: List[str]) -> Dict:
    ds_launcher = launcher("deepspeed")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rows.json"
        flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in FORWARDED]
        cmd = [ds_launcher, f"--num_gpus={args.nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(Path(__file__).resolve()), "--worker", f"--result-file={result}", f"--engines={','.join(engines)}",
               f"--methods={','.join(args.method_list)}", *flags]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"],
                   PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the {'/'.join(engines)} launch failed (exit {proc.returncode}): {' '.join(cmd)}")
        return json.loads(result.read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    argv = list(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows: List[Dict] = []
    backend = None
    if "single" in args.engine_list:
        rows += run_engine(args, "single")
    dist_engines = [e for e in args.engine_list if e in DIST_ENGINES]
    if dist_engines:
        launched = launch_workers(args, dist_engines)
        rows += launched["rows"]
        backend = launched["backend"]
    add_floors(args, rows)
    config = {k: getattr(args, k) for k in FORWARDED + ("smoke", "nproc")}
    config.update(engines=args.engine_list, methods=args.method_list, lr=LR, max_grad_norm=MAX_GRAD_NORM,
                  dtype="fp32", forward_flops_per_token=forward_flops(args))
    report = {"command": " ".join(["python benchmarks/peers.py", *argv]).strip(),
              "machine": {**machine(), "torch_threads": torch.get_num_threads()},
              "versions": versions(), "backend": backend, "config": config,
              "wall_seconds": time.perf_counter() - started,
              # Other processes on the machine would slow some methods and not others: the 1-minute
              # load average before and after says whether the run had the cores to itself.
              "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{args.name}.md").write_text(markdown(report))
    plot(report, args.out / f"{args.name}.png")
    print(markdown(report), flush=True)
    print(f"wrote {args.out / args.name}.{{json,md,png}}", flush=True)



# --- output -------------------------------------------------------------------------------------

def mib(b: float) -> str:
    return format_bytes(b, "MiB", 1, suffix=False)  # the table's columns say MiB


def markdown(report: Dict) -> str:
    c, m = report["config"], report["machine"]
    lines = [
        "# lisa_dist beside LoRA (peft) and requires_grad toggling (LMFlow-style), per engine", "",
        f"Command: `{report['command']}` ({report['wall_seconds'] / 60:.1f} min)", "",
        f"Machine: {m['cpu']} ({m['cpus_visible']} CPUs visible, shared), GPU: {m['gpu']}, "
        f"OMP_NUM_THREADS={m['omp_num_threads']} (one thread per process), {m['platform']}; distributed engines: "
        f"{c['nproc']} ranks, backend {report['backend']}; 1-minute load average "
        f"{report['load_average_1min']['before']:.2f} "
        f"before, {report['load_average_1min']['after']:.2f} after",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"Model: Llama from config, fp32, hidden {c['hidden']}, intermediate {c['intermediate']}, {c['layers']} "
        f"layers, {c['heads']} heads ({c['kv_heads']} KV), vocab {c['vocab']}; {c['batch']} x {c['seq']} tokens per "
        f"rank per step; AdamW lr {c['lr']}, gradient clipping {c['max_grad_norm']}; LISA gamma={c['gamma']}, "
        f"K={c['interval']}; {c['steps']} timed steps per method after {c['warmup']} warm-up, methods one after "
        "the other.", "",
        "| engine | method | trained params | model states / rank (MiB) | vs full | of which optimizer state + "
        "masters | peak RSS / rank (MiB, + over start) | median step | vs full | compute floor | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        s = r["model_state_bytes"]
        floor = (f"{r['compute_floor_seconds'] * 1e3:.0f} ms ({r['compute_fraction']:.2f} x full; measured "
                 f"{r['vs_floor']:.2f} x floor)" if "compute_floor_seconds" in r else "-")
        lines.append(
            f"| {ENGINE_LABELS[r['engine']]} | {r['method']} | {r['trainable_params']:,} | {mib(s['total'])} | "
            f"{r.get('model_state_vs_full', float('nan')):.2f}x | {mib(s['optimizer_state'] + s['master'])} | "
            f"{mib(r['peak_rss_bytes'])} (+{mib(r['peak_rss_over_start_bytes'])}) | "
            f"{r['median_step_seconds'] * 1e3:.0f} ms | "
            f"{r.get('step_time_vs_full', float('nan')):.2f}x | {floor} | {r['tokens_per_second']:.0f} |")
    f = c["forward_flops_per_token"]
    lines += [
        "",
        "Model states: weights + gradients + fp32 masters + optimizer state of the largest rank, counted from "
        "the live tensors at the fullest moment of an extra untimed step (single/FSDP2: right after the "
        "optimizer step, before zero_grad; ZeRO: after backward, before engine.step(), with "
        "lisa_dist.backends.deepspeed.model_state_bytes). fp32 weights are their own masters under plain torch and "
        "FSDP2; DeepSpeed keeps a separate fp32 partition. Peak RSS: the process's host resident-set "
        "high-water mark (VmHWM, reset before building the method) over build, warm-up and steps; it "
        "includes the Python process, libraries and activations; + over start is that peak minus the RSS "
        "just before building (memory freed by earlier methods can stay mapped in the process, so the peak "
        "alone creeps up method after method). Tokens/s: all ranks together.",
        "",
        "Compute floor = what the step's compute alone costs a rank: the single-process full fine-tuning "
        "median step time (same batch per rank, one thread, no communication) x the method's compute "
        "fraction, averaged over the timed steps' active sets; the distributed engines' full rows get "
        "fraction 1, so their measured / floor is the engine's communication and bookkeeping. From forward "
        "FLOPs per token F (decoder layer "
        f"{f['layer']:,}: projections 2 x params + attention 4 x seq x hidden; LM head {f['head']:,}; "
        "embeddings none): full fine-tuning costs 3F per part; a trained part 3F; a frozen part that the "
        "backward passes through 2F (forward + input gradient, about 2/3); a frozen part below the lowest "
        "trained one F (forward only: with train_embeddings=False the backward stops at the lowest active "
        "layer). LoRA rows: 2F everywhere (adapters' own cost left out). The single-process optimizer step "
        "(about a tenth of that step) is scaled like compute.",
        "",
        "naive follows the same layer schedule as lisa. On one process torch AdamW creates state lazily for "
        "each layer the callback unfreezes and never frees it, so its optimizer state grows with every switch "
        "toward full fine-tuning's; under ZeRO the engine owns every parameter from deepspeed.initialize on, "
        "so its optimizer state equals full fine-tuning's from the first step "
        "(docs/design.md#why-callback-lisa-saves-nothing).",
        "",
        "CPU numbers: shared 2-core machine, gloo; absolute times are not GPU figures, ratios are measured "
        "side by side in one run.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    engines = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
    methods = [mt for mt in METHODS if any(r["method"] == mt for r in rows)]
    by = {(r["engine"], r["method"]): r for r in rows}
    width = 0.8 / len(methods)
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(14, 5))
    for j, mt in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(engines))]
        ax_mem.bar(xs, [by[(e, mt)]["model_state_bytes"]["total"] / 2 ** 20 if (e, mt) in by else 0 for e in engines],
                   width, label=mt)
        ax_time.bar(xs, [by[(e, mt)]["median_step_seconds"] * 1e3 if (e, mt) in by else 0 for e in engines],
                    width, label=mt)
        floors = [(x, by[(e, mt)]["compute_floor_seconds"] * 1e3) for x, e in zip(xs, engines)
                  if "compute_floor_seconds" in by.get((e, mt), {})]
        if floors:
            ax_time.scatter(*zip(*floors), color="black", marker="_", s=150, zorder=3,
                            label="compute floor" if j == len(methods) - 1 else None)
    for ax, title, unit in ((ax_mem, "Model states per rank", "MiB"), (ax_time, "Median step time", "ms")):
        ax.set_xticks(range(len(engines)), [ENGINE_LABELS[e] for e in engines])
        ax.set_title(title)
        ax.set_ylabel(unit)
    ax_mem.legend(fontsize=8)
    ax_time.legend(fontsize=8)
    c = report["config"]
    fig.suptitle(f"{report['machine']['cpu']}, 1 thread/process; Llama fp32 {c['layers']}x{c['hidden']}, vocab "
                 f"{c['vocab']}, {c['batch']}x{c['seq']} tokens/rank; gamma={c['gamma']}, K={c['interval']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
