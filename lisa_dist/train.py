"""`lisa-train`: fine-tune a causal LM with LISA on one process, DeepSpeed ZeRO or FSDP2.

With no arguments it fine-tunes the embedded tiny Llama on the shipped Alpaca-style data on
whatever device there is. Every flag can also come from a YAML/JSON file (`--config`), with the
flag's name as key (dashes or underscores); flags on the command line win over the file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .config import SAMPLING_MODES, LisaConfig

BACKENDS = ("single", "deepspeed", "fsdp2")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lisa-train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML or JSON file whose keys are these flags' names")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="tiny-llama",
                   help="a preset name (tiny-llama: random init, no download), a local directory written by "
                        "save_pretrained, or a Hugging Face model id")
    g.add_argument("--tokenizer", help="tokenizer directory or id; default: the model's, or the embedded one for presets")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom modelling code of --model")
    g.add_argument("--data", help="JSONL file (Alpaca, chat or plain text); default: the shipped Alpaca-style set")
    g.add_argument("--data-format", default="auto", choices=("auto", "alpaca", "chat", "text"))
    g.add_argument("--max-length", type=int, default=128, help="tokens per example, longer ones are truncated")
    g.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="weights dtype; masters are always fp32. auto: bf16 on a GPU, fp32 on a CPU, where bf16 "
                        "matmuls are emulated (measured 8x slower per step for the tiny preset here)")
    g = p.add_argument_group("LISA")
    g.add_argument("--activated-layers", type=int, default=2, help="gamma: decoder layers trained at a time")
    g.add_argument("--interval-steps", type=int, default=20, help="K: optimizer steps between switches")
    g.add_argument("--seed", type=int, default=0, help="seeds the layer schedule, the init of presets and data order")
    g.add_argument("--state-policy", default="reset", choices=("reset", "offload"))
    g.add_argument("--layers-path", help="dotted path of the decoder blocks, e.g. model.layers (auto-detected)")
    g.add_argument("--no-train-embeddings", action="store_true", help="freeze the input embeddings")
    g.add_argument("--no-train-head", action="store_true", help="freeze the LM head and final norm")
    # issue 17 (importance-weighted sampling): two flags, mapped onto LisaConfig in _validate
    g.add_argument("--sampling", default="uniform", choices=SAMPLING_MODES,
                   help="how layers are drawn: uniform (the paper), weighted (--layer-weights), outlier "
                        "(OwLore outlier ratios from calibration batches) or gradient (gradient-norm moving average)")
    g.add_argument("--layer-weights", help="with --sampling weighted: one non-negative weight per decoder layer, "
                                           "comma-separated (e.g. 1,1,2,4)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=150, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch per rank")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=10)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g = p.add_argument_group("backend")
    g.add_argument("--backend", default="single", choices=BACKENDS)
    g.add_argument("--deepspeed", help="DeepSpeed JSON config (ds_configs/zero2.json ...); with --backend deepspeed")
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help=argparse.SUPPRESS)
    g.add_argument("--cpu-offload", action="store_true", help="FSDP2: keep sharded params and optimizer on the CPU")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default="runs/lisa", help="final weights, tokenizer and lisa_log.json")
    g.add_argument("--log-every", type=int, default=10, help="steps between log lines when there is no terminal")
    g.add_argument("--no-save", action="store_true", help="skip writing the final weights")
    g.add_argument("--save-steps", type=int, default=0,
                   help="write a resumable checkpoint to OUTPUT_DIR/checkpoints/step-N every N optimizer steps "
                        "and at the last one (0: never)")
    g.add_argument("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0: keep all)")
    g.add_argument("--resume", metavar="PATH|auto",
                   help="continue from a checkpoint directory, or `auto`: the latest complete one in "
                        "OUTPUT_DIR/checkpoints (a fresh start if there is none)")
    g.add_argument("--dry-run", action="store_true",
                   help="print world size, per-rank memory estimate (full vs LISA) and the first switches, "
                        "from the model's config on the meta device (no weights loaded), then exit")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_read_config_file(pre.config, parser))
    args = parser.parse_args(argv)
    _validate(args, parser)
    return args


def _read_config_file(path: str, parser: argparse.ArgumentParser) -> Dict:
    file = Path(path)
    if not file.is_file():
        parser.error(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:  # yaml and json raise different types; both mean a malformed file
        parser.error(f"--config {path}: cannot parse: {e}")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    out = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        if dest not in known or dest == "config":
            parser.error(f"--config {path}: unknown key {key!r}; keys are the flag names, e.g. activated_layers")
        out[dest] = value
    return out


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("steps", "batch_size", "grad_accum", "max_length", "log_every"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("save_steps", "keep_last"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.backend == "deepspeed" and not args.deepspeed:
        parser.error("--backend deepspeed needs --deepspeed CONFIG.json (see ds_configs/)")
    if args.deepspeed and args.backend != "deepspeed":
        parser.error("--deepspeed is only used with --backend deepspeed")
    try:
        args.lisa = LisaConfig(activated_layers=args.activated_layers, interval_steps=args.interval_steps,
                               seed=args.seed, train_embeddings=not args.no_train_embeddings,
                               train_head=not args.no_train_head, layers_path=args.layers_path,
                               state_policy=args.state_policy, sampling=args.sampling,
                               layer_weights=_layer_weights(args.layer_weights))
    except ValueError as e:
        parser.error(str(e))


def _layer_weights(value) -> Optional[List[float]]:
    """--layer-weights "1,1,2" (or a YAML list in --config) as floats; issue 17."""
    if value is None or isinstance(value, (list, tuple)):
        return value
    try:
        return [float(x) for x in str(value).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layer-weights {value!r}: expected comma-separated numbers, one per decoder layer, "
                         "e.g. 1,1,2,4") from None


def load_model_and_tokenizer(args):
    """The model (a preset with random init, or from_pretrained) and its tokenizer."""
    import torch

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if args.backend == "deepspeed":
        from .deepspeed.loading import load_partitioned
        # ZeRO-3: partitioned as it is built, never whole on a rank
        loaded = load_partitioned(resolve_ds_config(args, dtype), lambda: build_model_and_tokenizer(args, dtype))
        if loaded is not None:
            return loaded
    return build_model_and_tokenizer(args, dtype)


def build_model_and_tokenizer(args, dtype):
    """Build a preset or call from_pretrained; under ZeRO-3 the caller keeps transformers'
    HfDeepSpeedConfig alive so both paths construct the model partitioned."""
    import torch
    import transformers

    from . import presets

    if args.model in presets.PRESETS:
        tokenizer = (transformers.AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer
                     else presets.default_tokenizer())
        torch.manual_seed(args.seed)
        model = transformers.AutoModelForCausalLM.from_config(presets.PRESETS[args.model](tokenizer), dtype=dtype)
        return model, tokenizer
    if not Path(args.model).is_dir() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"--model {args.model}: not a preset ({', '.join(presets.PRESETS)}) nor a local "
                                "directory, and HF_HUB_OFFLINE=1 forbids downloading it")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model,
                                                           trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def make_runner(args, model, calibration=None):
    """`calibration`: sampling="outlier" only, a callable (rank, world_size) -> batches (issue 17)."""
    if args.backend == "single":
        from .single import SingleRunner
        return SingleRunner(model, args.lisa, lr=args.lr, weight_decay=args.weight_decay,
                            warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm, calibration=calibration)
    if args.backend == "deepspeed":
        from .deepspeed.runner import DeepSpeedRunner
        return DeepSpeedRunner(model, args.lisa, resolve_ds_config(args, next(model.parameters()).dtype),
                               calibration=calibration)
    from .fsdp import FSDPRunner
    return FSDPRunner(model, args.lisa, lr=args.lr, weight_decay=args.weight_decay,
                      warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
                      cpu_offload=args.cpu_offload, activation_checkpointing=args.gradient_checkpointing,
                      calibration=calibration)


def resolve_ds_config(args, dtype) -> Dict:
    """The DeepSpeed config with lisa-train's flags applied.

    The JSON file owns the ZeRO stage, buckets, offload, optimizer type and betas; the flags own
    what a user tunes per run (batch, accumulation, LR, warm-up, clipping, precision), so one
    config file serves every model size and the command line never silently loses to the file.
    """
    path = Path(args.deepspeed)
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed {path}: no such file; the shipped configs are in ds_configs/")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed {path}: not valid JSON: {e}") from e
    import torch

    cfg["train_micro_batch_size_per_gpu"] = args.batch_size
    cfg["gradient_accumulation_steps"] = args.grad_accum
    cfg.pop("train_batch_size", None)  # DeepSpeed derives it; a stale value would contradict the flags
    cfg["gradient_clipping"] = args.max_grad_norm
    bf16 = dtype == torch.bfloat16
    cfg.setdefault("bf16", {})["enabled"] = bf16
    cfg.pop("fp16", None)
    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    opt.setdefault("params", {}).update(lr=args.lr, weight_decay=args.weight_decay)
    sched = cfg.get("scheduler")
    if sched and sched.get("type") in ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR"):
        params = sched.setdefault("params", {})
        params["warmup_num_steps"] = args.warmup_steps
        if "warmup_max_lr" in params or sched["type"] != "WarmupCosineLR":
            params["warmup_max_lr"] = args.lr
        if sched["type"] in ("WarmupDecayLR", "WarmupCosineLR"):
            params["total_num_steps"] = args.steps
    return cfg


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _say(line: str) -> None:
    # One write per line: ranks share the launcher's stdout, and print() writes text and newline
    # separately, which interleaves ranks' lines mid-line.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _per_rank(value: int, world: int) -> List[int]:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return [value]
    values: List[int] = [0] * world
    dist.all_gather_object(values, value)
    return values


def train(args) -> Dict:
    from tqdm import tqdm

    from . import checkpoint, data, presets

    data_path = Path(args.data) if args.data else presets.DEFAULT_DATA
    model, tokenizer = load_model_and_tokenizer(args)
    dataset = data.build_dataset(data_path, tokenizer, max_length=args.max_length, fmt=args.data_format)
    if args.gradient_checkpointing and args.backend != "fsdp2":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = data.BatchIterator(dataset, args.batch_size, args.seed, tokenizer.pad_token_id)
    calibration = None
    if args.lisa.sampling == "outlier":  # issue 17: the first training batches of each rank
        def calibration(rank, world):
            return [batches.batch(i, rank=rank, world_size=world) for i in range(args.lisa.calibration_batches)]
    runner = make_runner(args, model, calibration)
    rank, world = runner.rank, runner.world_size
    device = next(model.parameters()).device
    out_dir = Path(args.output_dir)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _say(f"lisa-train: {args.model} | backend {args.backend} x{world} | {len(dataset)} examples from "
             f"{data_path} | gamma={args.lisa.activated_layers} K={args.lisa.interval_steps} "
             f"seed={args.lisa.seed} policy={args.lisa.state_policy} sampling={args.lisa.sampling}")
    # Every rank prints its own schedule line so disagreement is visible in multi-node logs too.
    _say(f"[rank {rank}/{world}] switch {runner.switch_index}: active layers {list(runner.active_layers)}")

    first_step = checkpoint.resume_for_train(runner, args)
    losses: List[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=args.steps, initial=first_step, disable=not is_main or not sys.stderr.isatty(), desc="lisa",
               unit="step")
    # Optimizers create moments at a parameter's first step, so the bytes logged at a switch miss
    # the new layers'; record each interval's figure once its set has stepped.
    stepped_pending = True
    stepped_bytes: List[int] = []
    for step in range(first_step, args.steps):
        micro = []
        for m in range(args.grad_accum):
            batch = batches.batch(step * args.grad_accum + m, rank=rank, world_size=world)
            tokens += int(batch["attention_mask"].sum())
            micro.append({k: v.to(device) for k, v in batch.items()})
        before = runner.switch_index
        loss = runner.train_step(micro)
        losses.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr or use --dtype fp32")
        if stepped_pending and runner.switch_index == before:
            stepped_bytes.append(runner.optimizer_state_bytes())
            runner.schedule_log[-1]["optimizer_bytes_after_first_step"] = stepped_bytes[-1]
        stepped_pending = runner.switch_index != before
        if stepped_pending:
            _say(f"[rank {rank}/{world}] switch {runner.switch_index} at step {step + 1}: "
                 f"active layers {list(runner.active_layers)}")
        rate = tokens / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s_rank=f"{rate:.0f}", layers=list(runner.active_layers))
        bar.update(1)
        if is_main and bar.disable and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            _say(f"step {step + 1}/{args.steps} loss {loss:.4f} tok/s/rank {rate:.0f} "
                 f"active {list(runner.active_layers)}")
        checkpoint.save_for_train(runner, args, step + 1, tokenizer)
        checkpoint.kill_for_test_after_step(step + 1)
    bar.close()
    elapsed = time.perf_counter() - start

    window = max(1, min(10, len(losses) // 5))
    summary = {
        "model": args.model, "backend": args.backend, "world_size": world, "steps": args.steps,
        "lisa": args.lisa.to_dict(), "seconds": elapsed, "tokens_per_second_per_rank": tokens / elapsed,
        "loss_start": sum(losses[:window]) / window, "loss_end": sum(losses[-window:]) / window,
        "losses": losses, "schedule": runner.schedule_log,
        "optimizer_bytes_per_rank": max(stepped_bytes + [runner.optimizer_state_bytes()]),
        "optimizer_bytes_all_ranks": _per_rank(max(stepped_bytes + [runner.optimizer_state_bytes()]), world),
        "full_finetune_optimizer_bytes_per_rank": runner.full_finetune_state_bytes(),
    }
    if not args.no_save:
        runner.save_pretrained(out_dir, tokenizer)
    if is_main:
        (out_dir / "lisa_log.json").write_text(json.dumps(summary, indent=1))
        ratio = summary["optimizer_bytes_per_rank"] / summary["full_finetune_optimizer_bytes_per_rank"]
        per_rank = ", ".join(f"rank {r}: {_fmt_bytes(b)}" for r, b in enumerate(summary["optimizer_bytes_all_ranks"]))
        _say(f"\nloss {summary['loss_start']:.4f} -> {summary['loss_end']:.4f} (mean of first/last {window} steps)\n"
             f"schedule: " + ", ".join(f"step {e['step']}: {e['active_layers']}" for e in runner.schedule_log) +
             f"\noptimizer memory per rank (fp32 master + moments): {per_rank}; full fine-tuning would hold "
             f"{_fmt_bytes(summary['full_finetune_optimizer_bytes_per_rank'])} per rank ({ratio:.2f}x)\n"
             f"{'weights and ' if not args.no_save else ''}log in {out_dir}")
    runner.close()
    del model
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.dry_run:
            from .plan import dry_run_report
            _say(dry_run_report(args))
            return 0
        train(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"lisa-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
