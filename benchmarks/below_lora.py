"""LISA at or below LoRA's peak memory on modern vocabularies (issue #25): the recommended setting,
measured on real checkpoints beside peft LoRA r=16, and planned for Llama-3-8B on 8 ranks.

    export LISA_DIST_CACHE=...      # benchmarks/real_assets.py's cache (checkpoints, GSM split)
    flock /tmp/lisa_cpu.lock python benchmarks/below_lora.py memory --model gemma3-270m
    flock /tmp/lisa_cpu.lock python benchmarks/below_lora.py memory --model smollm2-135m
    flock /tmp/lisa_cpu.lock python benchmarks/llama3_8b_plan.py     # the planner's Llama-3-8B table
    flock /tmp/lisa_cpu.lock python benchmarks/below_lora.py quality --model smollm2-135m --steps 60 \
        --methods frozen,full,lora     # held-out loss after the same training
    python benchmarks/below_lora.py report    # benchmarks/results/below_lora.{json,md}

The recommended setting is RECOMMENDED below: LISA with gamma=2, K=5 and the vocabulary matrices
(input embeddings, LM head and final norm) frozen, so LISA trains two whole decoder layers at a time
and nothing else. --activated-layers, --interval-steps, --seed and --sampling override it for every LISA
method (the sweeps under benchmarks/results/below_lora/sweep/; give each its own --parts folder).
`memory` writes one part per model under benchmarks/results/below_lora/; `report`
runs PLANNER_COMMAND (the dry run for Llama-3-8B with that setting, 8 ranks, ZeRO-2), reads its
printed `LISA / LoRA` ratio, and joins it with the parts and benchmarks/results/llama3_8b_plan.json.

memory: one process, one fp32 copy of the checkpoint per method (loaded fresh), the methods one after
the other in the order of --methods, the same real batches for each (the GSM-Symbolic training split
of real_assets.gsm_split, tokenized and masked as lisa-train does, --batch sequences of up to
--max-length tokens). For each method, the rise of the process's peak resident set (VmHWM, reset after
loading the model, minus the resident set then) over building the optimizer and --steps training steps
(forward, backward, clipping at 1.0, optimizer step). Methods:

- frozen: the recommended setting, `LisaOptimizer(model, LisaConfig(**RECOMMENDED), torch.optim.AdamW)`.
- frozen-switching: the same with interval_steps=2, so the measured steps cross switches.
- full: LISA with today's defaults (gamma 2, embeddings and head trained densely).
- rows: LISA with its defaults but embedding_update="rows" (lisa_dist/vocab_rows.py): the vocabulary
  matrices frozen, a trained delta for the rows of the tokens fed in training (at most 8192).
- lora: peft LoRA r=16, alpha 32, no dropout, on every linear layer but the head ("all-linear"), AdamW.

The default order measures the recommended setting first, in a process that has not yet freed
anything: glibc keeps some freed heap, which a later method's rise would not count.

quality: a part that already holds the same model, batch, length, steps and learning rates keeps its
rows for the methods this run does not train (each method starts from a fresh load and trains on the
same batches, so a method's row does not depend on the others); the base loss must come out the same.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from host_memory import host_rss_bytes, reset_peak_host_rss  # noqa: E402

from bench_common import machine, versions, write_report  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402

RECOMMENDED = {"activated_layers": 2, "interval_steps": 5, "seed": 0, "train_embeddings": False,
               "train_head": False}
"""LisaConfig field values of the recommended setting (every other field at its default)."""

LISA_TRAIN_ARGS = ["--activated-layers", "2", "--interval-steps", "5", "--seed", "0", "--no-train-embeddings",
                   "--no-train-head"]
"""The same setting as lisa-train flags."""

PLANNER_COMMAND = ("env WORLD_SIZE=8 python -m lisa_dist.train --dry-run --model launch/configs/llama3-8b "
                   "--backend deepspeed --deepspeed ds_configs/zero2.json --max-length 4096 --batch-size 1 "
                   "--dry-run-lora-rank 16 " + " ".join(LISA_TRAIN_ARGS))
"""The dry run for Llama-3-8B with the recommended setting: 8 ranks, ZeRO-2, micro-batch 1 x 4096 tokens,
no gradient checkpointing, beside LoRA r=16 on every linear layer (run from the repository root;
`lisa-train` is the same entry point as `python -m lisa_dist.train`)."""

METHODS = ("frozen", "frozen-switching", "full", "rows", "lora")
MODELS = ("smollm2-135m", "gemma3-270m")
PARTS = ROOT / "benchmarks" / "results" / "below_lora"
LORA_RANK = 16
SWEPT = ("activated_layers", "interval_steps", "seed", "sampling")
"""The LisaConfig fields the sweep flags set; every part's config records their effective values."""
LOGGED = ("activated_layers", "interval_steps", "seed", "sampling", "train_embeddings", "train_head",
          "embedding_update")
MAX_GRAD_NORM = 1.0


def lisa_config(method: str, **schedule) -> LisaConfig:
    """The method's LisaConfig; `schedule` (activated_layers, interval_steps, seed, sampling) overrides the
    recommended one."""
    shape = {"activated_layers": RECOMMENDED["activated_layers"], "interval_steps": RECOMMENDED["interval_steps"],
             "seed": RECOMMENDED["seed"], "sampling": RECOMMENDED.get("sampling", "uniform"),
             **{k: v for k, v in schedule.items() if v is not None}}
    if method == "frozen":
        return LisaConfig(**{**RECOMMENDED, **shape})
    if method == "frozen-switching":
        return LisaConfig(**{**RECOMMENDED, **shape, "interval_steps": 2})
    if method == "rows":
        return LisaConfig(**shape, embedding_update="rows")
    return LisaConfig(**shape)


def load_model(name: str):
    import real_assets
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(real_assets.checkpoint(name), dtype=torch.float32)


def train_batches(name: str, batch: int, max_length: int, count: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    """`count` batches of `batch` examples from the GSM-Symbolic training split, in a seeded order."""
    import random

    import real_assets

    from lisa_dist.recipe import data
    from lisa_dist.recipe.modeling import _tokenizer

    tok = _tokenizer(str(real_assets.checkpoint(name)), None, False)  # lisa-train's own (pad = eos when missing)
    train, _, _ = real_assets.gsm_split()
    dataset = data.build_dataset(train, tok, max_length=max_length)
    if batch * count > len(dataset):
        raise SystemExit(f"--steps {count} x --batch {batch} needs {batch * count} training examples; the GSM-Symbolic "
                         f"training split has {len(dataset)}: lower --steps or --batch")
    order = list(range(len(dataset)))
    random.Random(f"below-lora:{seed}").shuffle(order)
    return [data.collate([dataset[i] for i in order[b * batch:(b + 1) * batch]], tok.pad_token_id)
            for b in range(count)]


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def with_optimizer(model, method: str, lr: float, **schedule):
    """(model, optimizer) for a method: peft LoRA r=16 on every linear layer with AdamW over its
    adapters, or LisaOptimizer with the method's LisaConfig."""
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                                 target_modules="all-linear"))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    from lisa_dist.optim import LisaOptimizer

    return model, LisaOptimizer(model, lisa_config(method, **schedule), torch.optim.AdamW, lr=lr)


def train_step(model, optimizer, batch, scheduler=None) -> float:
    """Forward, backward, clipping at MAX_GRAD_NORM, optimizer (and scheduler) step; the loss."""
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], MAX_GRAD_NORM)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def schedule_args(args) -> Dict:
    return {"activated_layers": args.activated_layers, "interval_steps": args.interval_steps, "seed": args.seed,
            "sampling": args.sampling}


def measure(name: str, method: str, batches, **schedule) -> Dict:
    model = load_model(name)
    _trim()
    reset_peak_host_rss()
    start = host_rss_bytes()
    model, optimizer = with_optimizer(model, method, 1e-4 if method == "lora" else 1e-5, **schedule)
    model.train()
    times, losses = [], []
    for b in batches:
        t = time.perf_counter()
        losses.append(train_step(model, optimizer, b))
        times.append(time.perf_counter() - t)
    peak = host_rss_bytes("VmHWM")
    state = sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                if torch.is_tensor(t))
    row = {"model": name, "method": method, "rss_start_bytes": start, "peak_rss_bytes": peak,
           "rise_bytes": peak - start, "optimizer_state_bytes": state,
           "median_step_seconds": statistics.median(times), "losses": losses}
    if method != "lora":
        row["lisa_config"] = {k: getattr(optimizer.config, k) for k in LOGGED}
    if method == "rows":
        row["rows_used"] = model.lisa_vocab_rows.used()
    del optimizer, model
    _trim()
    return row


def memory(args) -> Dict:
    batches = train_batches(args.model, args.batch, args.max_length, args.steps)
    tokens = [int(b["attention_mask"].sum()) for b in batches]
    rows = []
    for method in args.method_list:
        row = measure(args.model, method, batches, **schedule_args(args))
        rows.append(row)
        print(f"{args.model} {method}: peak RSS rise {row['rise_bytes'] / 2 ** 30:.2f} GiB, "
              f"{row['median_step_seconds']:.1f} s/step", flush=True)
    return {"rows": rows, "tokens_per_batch": tokens, "widths": [int(b["input_ids"].shape[1]) for b in batches]}


def run_planner() -> Dict:
    """PLANNER_COMMAND from the repository root, as a user runs it; its output and printed ratio."""
    argv = shlex.split(PLANNER_COMMAND)
    env_assign = [a for a in argv[1:] if "=" in a and not a.startswith("-")][:1]
    env = dict(os.environ, **dict(a.split("=", 1) for a in env_assign),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, *argv[argv.index("python") + 1:]]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    ratio = float(re.search(r"LISA / LoRA = ([0-9.]+)", out).group(1))
    peaks = {}
    for name, key in (("full FT", "full"), ("LISA g=", "lisa"), ("LoRA r=", "lora")):
        line = next(line for line in out.splitlines() if line.startswith(name) and line.rstrip().endswith(
            ("backward", "optimizer step")))
        peaks[key] = float(line[14:].split()[2])
    return {"command": PLANNER_COMMAND, "lisa_over_lora": ratio, "peaks_gib": peaks, "output": out}


def report(parts: Path) -> Dict:
    measured = {}
    for path in sorted(parts.glob("memory-*.json")):
        part = json.loads(path.read_text())
        measured[part["config"]["model"]] = part
    planner = run_planner()
    plan8b = ROOT / "benchmarks" / "results" / "llama3_8b_plan.json"
    table = json.loads(plan8b.read_text()) if plan8b.exists() else None
    rows = [row for part in measured.values() for row in memory_rows(part)]
    result = {"planner_command": PLANNER_COMMAND, "lisa_config": RECOMMENDED, "lisa_train_args": LISA_TRAIN_ARGS,
              "rows": rows, "planner": planner, "measured": measured, "llama3_8b_plan": table,
              "quality": {}}
    for path in sorted(parts.glob("quality-*.json")):
        part = json.loads(path.read_text())
        result["quality"][part["config"]["model"]] = part
    result["quality_sweeps"] = sweep_rows(parts)
    result["memory_sweeps"] = [dict(row, part=str(path.relative_to(ROOT)))
                               for path in sorted(parts.glob("*/memory-*.json"))
                               for row in memory_rows(json.loads(path.read_text()))]
    return result


def memory_rows(part: Dict) -> List[Dict]:
    """A memory part's rows: each method's rise of peak RSS, and that over LoRA's in the same process."""
    lora = next((r["rise_bytes"] for r in part["rows"] if r["method"] == "lora"), None)
    return [{"model": part["config"]["model"], "method": r["method"], "rise_bytes": r["rise_bytes"],
             "rise_over_lora": r["rise_bytes"] / lora if lora else None, "lisa_config": r.get("lisa_config"),
             "batch": part["config"]["batch"], "max_length": part["config"]["max_length"],
             "steps": part["config"]["steps"], "command": part["command"]} for r in part["rows"]]


def sweep_rows(parts: Path) -> List[Dict]:
    """One row per trained method of every quality part in a folder under `parts` (the sweeps of learning
    rate, gamma, K and steps), with the settings it ran under."""
    # Parts written before the benchmark recorded gamma and K ran the setting recommended then: 2 and 20.
    before = {"activated_layers": 2, "interval_steps": 20, "seed": 0, "sampling": "uniform"}
    rows = []
    for path in sorted(parts.glob("*/quality-*.json")):
        part = json.loads(path.read_text())
        base = part["rows"][0]["heldout"]["loss"]
        for r in part["rows"][1:]:
            schedule = {**before, **part["config"], **(r.get("lisa_config") or {})}
            rows.append({"part": str(path.relative_to(ROOT)), "model": part["config"]["model"], "method": r["method"],
                         "steps": r["steps"], "lr": r["lr"],
                         **{k: None if r["method"] == "lora" and k != "seed" else schedule[k] for k in before},
                         "heldout_loss": r["heldout"]["loss"], "base_loss": base, "command": part["command"]})
    return rows


def markdown(result: Dict) -> str:
    gib = 2 ** 30
    lines = ["# LISA at or below LoRA's peak memory: the recommended setting", "",
             f"Setting: `LisaConfig(**{json.dumps(result['lisa_config'])})`, lisa-train flags "
             f"`{' '.join(result['lisa_train_args'])}`.", "",
             "## Planned: Llama-3-8B, 8 ranks", "", f"`{result['planner_command']}`", "",
             f"Peak per rank (GiB): full FT {result['planner']['peaks_gib']['full']:.2f}, LISA "
             f"{result['planner']['peaks_gib']['lisa']:.2f}, LoRA r=16 {result['planner']['peaks_gib']['lora']:.2f}; "
             f"printed `LISA / LoRA = {result['planner']['lisa_over_lora']:.2f}`.", "",
             "## Measured: one process, fp32, real GSM-Symbolic batches, rise of peak RSS", ""]
    for model, part in result["measured"].items():
        cfg = part["config"]
        lines += [f"### {model}", "", f"Command: `{part['command']}` ({cfg['batch']} sequences of up to "
                  f"{cfg['max_length']} tokens, {cfg['steps']} steps). Machine: {part['machine']['cpu']}; "
                  + ", ".join(f"{k} {v}" for k, v in part["versions"].items()), "",
                  "| method | peak RSS rise GiB | optimizer state GiB | s/step | rise / LoRA's |",
                  "|---|---:|---:|---:|---:|"]
        lora = next((r["rise_bytes"] for r in part["rows"] if r["method"] == "lora"), None)
        for r in part["rows"]:
            rel = f"{r['rise_bytes'] / lora:.2f}" if lora else ""
            lines.append(f"| {r['method']} | {r['rise_bytes'] / gib:.2f} | {r['optimizer_state_bytes'] / gib:.3f} | "
                         f"{r['median_step_seconds']:.1f} | {rel} |")
        lines.append("")
    lines += ["## Held-out loss after the same training (20 held-out GSM8K problems, masked as --eval-data)", ""]
    if not result["quality"]:
        lines += ["Not measured yet: `python benchmarks/below_lora.py quality --model MODEL --steps N`.", ""]
    for model, part in result["quality"].items():
        cfg = part["config"]
        lines += [f"### {model}", "", f"Command: `{part['command']}` ({cfg['batch']} sequences of up to "
                  f"{cfg['max_length']} tokens per step, {cfg['steps']} steps, linear warm-up over a tenth then "
                  f"decay to 0, clipping {MAX_GRAD_NORM}; {part['wall_seconds'] / 60:.0f} min). Machine: "
                  f"{part['machine']['cpu']}; " + ", ".join(f"{k} {v}" for k, v in part["versions"].items()), "",
                  "| method | peak lr | held-out loss | vs base | train s |", "|---|---:|---:|---:|---:|"]
        base = part["rows"][0]["heldout"]["loss"]
        for r in part["rows"]:
            lines.append(f"| {r['method']} | {r.get('lr', '')} | {r['heldout']['loss']:.4f} | "
                         f"{r['heldout']['loss'] / base:.3f} | {r.get('train_seconds', 0):.0f} |")
        lines.append("")
    if result.get("memory_sweeps"):
        lines += ["## Memory sweeps: gamma and K (one process, the same batches, rise of peak RSS)", "",
                  "| model | method | gamma | K | peak RSS rise GiB | / LoRA's in the same run | part |",
                  "|---|---|---:|---:|---:|---:|---|"]
        for r in result["memory_sweeps"]:
            cfg = r["lisa_config"] or {}
            lines.append(f"| {r['model']} | {r['method']} | {cfg.get('activated_layers', '')} | "
                         f"{cfg.get('interval_steps', '')} | {r['rise_bytes'] / gib:.2f} | {r['rise_over_lora']:.2f} | "
                         f"{Path(r['part']).name} |")
        lines.append("")
    if result.get("quality_sweeps"):
        lines += ["## Sweeps: learning rate, gamma, K, steps (one process, fp32, 4 x up to 256 tokens per step)", "",
                  "Each row: one method trained from the checkpoint with these settings; the part file holds the "
                  "command, machine and versions. gamma / K are LISA's (blank for LoRA).", "",
                  "| model | steps | method | peak lr | gamma | K | sampling | seed | held-out loss | vs base | part |",
                  "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---|"]
        for r in result["quality_sweeps"]:
            lisa = r["method"] != "lora"
            gamma, k, sampling = (r["activated_layers"], r["interval_steps"], r["sampling"]) if lisa else ("", "", "")
            lines.append(f"| {r['model']} | {r['steps']} | {r['method']} | {r['lr']:g} | {gamma} | {k} | {sampling} | "
                         f"{r['seed']} | {r['heldout_loss']:.4f} | {r['heldout_loss'] / r['base_loss']:.3f} | "
                         f"{Path(r['part']).parent.name}/{Path(r['part']).name} |")
        lines.append("")
    return "\n".join(lines)


def _schedule(optimizer, steps: int):
    """Linear warm-up over the first tenth, then linear decay to 0: the same for every method."""
    warmup = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))


def heldout(model, name: str, max_length: int) -> Dict:
    """Mean loss over the supervised tokens of the 20 held-out GSM8K originals, tokenized and masked as
    lisa-train's --eval-data does (lisa_dist.evaluation.loss_sums, the code behind it)."""
    import real_assets

    from lisa_dist.evaluation import loss_sums
    from lisa_dist.recipe import data
    from lisa_dist.recipe.modeling import _tokenizer

    tok = _tokenizer(str(real_assets.checkpoint(name)), None, False)
    _, originals, _ = real_assets.gsm_split()
    dataset = data.build_dataset(originals, tok, max_length=max_length)
    batches = [data.collate(dataset[i:i + 4], tok.pad_token_id) for i in range(0, len(dataset), 4)]
    total, count = loss_sums(model, batches, torch.device("cpu"))
    return {"loss": total / count, "tokens": count, "examples": len(dataset)}


def quality(args) -> Dict:
    """Each method from the same checkpoint over the same --steps batches, then the held-out loss."""
    batches = train_batches(args.model, args.batch, args.max_length, args.steps)
    base = load_model(args.model)
    rows = [{"model": args.model, "method": "base", "heldout": heldout(base, args.model, args.max_length)}]
    del base
    for method in args.method_list:
        lr = args.lora_lr if method == "lora" else args.lr
        torch.manual_seed(args.seed or 0)  # LoRA's random init
        model, optimizer = with_optimizer(load_model(args.model), method, lr, **schedule_args(args))
        scheduler = _schedule(optimizer, args.steps)
        model.train()
        started = time.perf_counter()
        losses = [train_step(model, optimizer, b, scheduler) for b in batches]
        row = {"model": args.model, "method": method, "lr": lr, "steps": args.steps,
               **({"lisa_config": {k: getattr(optimizer.config, k) for k in LOGGED}} if method != "lora" else {}),
               "train_seconds": time.perf_counter() - started, "train_losses": losses,
               "heldout": heldout(model, args.model, args.max_length)}
        if method == "rows":
            row["rows_used"] = model.lisa_vocab_rows.used()
        rows.append(row)
        print(f"{args.model} {method} lr {lr:g}: held-out loss {row['heldout']['loss']:.4f} "
              f"(base {rows[0]['heldout']['loss']:.4f}), {row['train_seconds']:.0f} s", flush=True)
        del optimizer, model
        _trim()
    return {"rows": rows}


def merge_quality(old: Dict, new: Dict) -> Dict:
    """`new` plus the rows of `old` for methods `new` did not train, when both trained the same way."""
    same = ("model", "batch", "max_length", "steps", "lr", "lora_lr", *SWEPT)
    if any(old["config"].get(k) != new["config"].get(k) for k in same):
        return new
    old_base, new_base = old["rows"][0]["heldout"]["loss"], new["rows"][0]["heldout"]["loss"]
    if old_base != new_base:
        raise SystemExit(f"base held-out loss {new_base} differs from the saved part's {old_base}: not merging; "
                         "rerun every method with --methods")
    trained = set(new["config"]["methods"])
    kept = [r for r in old["rows"][1:] if r["method"] not in trained]
    methods = [r["method"] for r in kept] + new["config"]["methods"]
    return {**new, "command": f"{old['command']}; {new['command']}", "config": {**new["config"], "methods": methods},
            "wall_seconds": old["wall_seconds"] + new["wall_seconds"], "rows": new["rows"][:1] + kept + new["rows"][1:]}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("memory", "quality", "report"))
    p.add_argument("--model", choices=MODELS, default="gemma3-270m")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}, in order")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="training steps (memory: 6; quality: e.g. 60)")
    p.add_argument("--lr", type=float, default=1e-4, help="quality: LISA's peak learning rate")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="quality: LoRA's peak learning rate")
    p.add_argument("--activated-layers", type=int, default=None,
                   help=f"LISA methods' gamma (default {RECOMMENDED['activated_layers']}, the recommended setting's)")
    p.add_argument("--interval-steps", type=int, default=None,
                   help=f"LISA methods' K (default {RECOMMENDED['interval_steps']}; frozen-switching keeps 2)")
    p.add_argument("--seed", type=int, default=None,
                   help="quality: LISA's sampling seed and LoRA's init seed (default 0); the batches stay the same")
    p.add_argument("--sampling", choices=("uniform", "gradient"), default=None,
                   help="LISA methods' layer sampling (default: the recommended setting's)")
    p.add_argument("--parts", type=Path, default=PARTS)
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    if args.mode == "report":
        result = report(args.parts)
        write_report(ROOT / "benchmarks" / "results" / "below_lora", result, markdown)
        return
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    started = time.perf_counter()
    result = memory(args) if args.mode == "memory" else quality(args)
    part = {"mode": args.mode, "command": " ".join(["python benchmarks/below_lora.py", *argv]),
            "machine": {**machine(), "torch_threads": torch.get_num_threads()}, "versions": versions(),
            "config": {"model": args.model, "batch": args.batch, "max_length": args.max_length, "steps": args.steps,
                       "methods": args.method_list, "lora_rank": LORA_RANK,
                       **({"lr": args.lr, "lora_lr": args.lora_lr} if args.mode == "quality" else {}),
                       **{k: getattr(lisa_config("full", **schedule_args(args)), k) for k in SWEPT}},
            "wall_seconds": time.perf_counter() - started, **result}
    args.parts.mkdir(parents=True, exist_ok=True)
    path = args.parts / f"{args.mode}-{args.model}.json"
    if args.mode == "quality" and path.exists():
        part = merge_quality(json.loads(path.read_text()), part)
    path.write_text(json.dumps(part, indent=1))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
