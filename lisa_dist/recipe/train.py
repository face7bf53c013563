"""`lisa-train`: fine-tune a causal LM with LISA on one process, DeepSpeed ZeRO or FSDP2.

With no arguments it fine-tunes the embedded tiny Llama on the shipped Alpaca-style data on
whatever device there is. Every flag can also come from a YAML/JSON file (`--config`), with the
flag's name as key (dashes or underscores); flags on the command line win over the file.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from lisa_dist.devices import rank_device
from lisa_dist.layers import find_decoder_layers, tied_freeze_problem
from lisa_dist.memory import device_memory, format_bytes, host_peak_rss_bytes, map_large_host_blocks
from lisa_dist.protocol import Runner
from lisa_dist.recipe.ds_config import resolve_ds_config
from lisa_dist.recipe.modeling import (
    build_empty_model_and_tokenizer,
    build_from_config_and_tokenizer,
    build_model_and_tokenizer,
    check_model_source,
    check_vocabulary,
    checkpoint_files,
    weights_dtype,
    weights_loader,
)
from lisa_dist.recipe.run_config import RunConfig
from lisa_dist.recipe.run_config import parse_args as _parse_args


class _Single:
    host_block = 1024 ** 2  # memory.map_large_host_blocks; FSDP2's, unmeasured here

    @staticmethod
    def load(run: RunConfig, dtype):
        model, tokenizer = _build(run, dtype)
        return model.to(rank_device()), tokenizer  # the GPU when there is one (LOCAL_RANK's)

    @staticmethod
    def runner(run: RunConfig, model, calibration=None) -> Runner:
        from lisa_dist.backends.single import SingleRunner
        _checkpoint_activations(run, model)
        return SingleRunner(model, run.lisa, lr=run.lr, weight_decay=run.weight_decay,
                            warmup_steps=run.warmup_steps, max_grad_norm=run.max_grad_norm, calibration=calibration)


class _DeepSpeed:
    # memory.map_large_host_blocks: with 256 KiB ZeRO-3's first step peaked about 90 MiB per rank lower
    # than with 1 MiB on the 512 MiB checkpoint at 2 ranks (a run before the results file); its CPU step
    # cost 18% more than glibc's threshold, under FSDP2's 30% (benchmarks/results/load_memory.md).
    host_block = 256 * 1024

    @staticmethod
    def load(run: RunConfig, dtype):
        from lisa_dist.backends.deepspeed.loading import load_partitioned
        from lisa_dist.backends.deepspeed.process_group import fp16_supported
        if dtype == torch.float16 and not fp16_supported():
            raise ValueError("--dtype fp16: DeepSpeed's accelerator on this machine has no fp16 support (a CPU "
                             "without oneDNN fp16 kernels, or a GPU without fp16); use --dtype bf16 or --dtype fp32")
        # ZeRO-3 builds the model partitioned, never whole on a rank (a safetensors checkpoint from
        # its config, then filled); other stages get None back and load onto the rank's device.
        files = checkpoint_files(run.model)
        build = ((lambda: build_from_config_and_tokenizer(run.model, dtype, tokenizer=run.tokenizer,
                                                          trust_remote_code=run.trust_remote_code))
                 if files else (lambda: _build(run, dtype)))
        return (load_partitioned(resolve_ds_config(run, dtype), build, _preset_init(run, dtype), files)
                or _build(run, dtype, device=rank_device()))

    @staticmethod
    def runner(run: RunConfig, model, calibration=None) -> Runner:
        from lisa_dist.backends.deepspeed.runner import DeepSpeedRunner
        _checkpoint_activations(run, model)
        return DeepSpeedRunner(model, run.lisa, resolve_ds_config(run, next(model.parameters()).dtype),
                               calibration=calibration)


class _FSDP2:
    # memory.map_large_host_blocks: 1 MiB kept 95% of 256 KiB's saving on FSDP2 (peak 1034 against 991 MiB
    # per rank, 1879 with glibc's threshold) for 18% more CPU step time where 256 KiB took 30%
    # (benchmarks/results/load_memory.md).
    host_block = 1024 ** 2

    @staticmethod
    def load(run: RunConfig, dtype):
        # Parameters on the meta device: the runner shards the empty model, then fills each shard.
        return build_empty_model_and_tokenizer(run.model, dtype, tokenizer=run.tokenizer,
                                               trust_remote_code=run.trust_remote_code)

    @staticmethod
    def runner(run: RunConfig, model, calibration=None) -> Runner:
        from lisa_dist.backends.fsdp import FSDPRunner
        # FSDP2 wraps each block in its own checkpoint unit, inside the sharding.
        return FSDPRunner(model, run.lisa, lr=run.lr, weight_decay=run.weight_decay,
                          warmup_steps=run.warmup_steps, max_grad_norm=run.max_grad_norm,
                          cpu_offload=run.cpu_offload, activation_checkpointing=run.gradient_checkpointing,
                          load_weights=weights_loader(run.model, seed=run.lisa.seed, tokenizer=run.tokenizer,
                                                      trust_remote_code=run.trust_remote_code),
                          calibration=calibration)


BACKENDS = {"single": _Single, "deepspeed": _DeepSpeed, "fsdp2": _FSDP2}
"""--backend -> how it loads the model and which Runner trains it."""


def _build(run: RunConfig, dtype, device=None):
    return build_model_and_tokenizer(run.model, dtype, seed=run.lisa.seed, tokenizer=run.tokenizer,
                                     trust_remote_code=run.trust_remote_code, device=device)


def _preset_init(run: RunConfig, dtype):
    """For a preset, its single-process (seeded, whole) weights, which ZeRO-3 copies into the
    partitioned build so every backend starts from the same model; None for checkpoints."""
    from lisa_dist.recipe import presets
    if run.model not in presets.PRESETS:
        return None
    return lambda: _build(run, dtype)[0].state_dict()


def _checkpoint_activations(run: RunConfig, model) -> None:
    if run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _calibration(run: RunConfig, batches):
    """sampling="outlier": each rank's first training batches, once the runner knows its rank."""
    if run.lisa.sampling != "outlier":
        return None
    return lambda rank, world: [batches.batch(i, rank=rank, world_size=world)
                                for i in range(run.lisa.calibration_batches)]


def _say(line: str) -> None:
    # One write per line: ranks share the launcher's stdout, and print() writes text and newline
    # separately, which interleaves ranks' lines mid-line.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _length_line(report) -> str:
    """One line on the examples --max-length cut or left out (data.LengthReport), and what to change."""
    where = f"longer than --max-length {report.max_length} tokens (the longest has {report.longest})"
    if report.overlong == "drop":
        return (f"data: left out {report.dropped} of {report.records} examples {where} (--overlong drop); "
                "raise --max-length to train on them")
    dropped = (f", and left out {report.dropped} more whose prompt fills the window" if report.dropped else "")
    return (f"data: cut {report.truncated} of {report.records} examples {where} to their first {report.max_length}, "
            f"so their ends (the last response tokens and EOS) are not trained on{dropped}; raise --max-length, "
            "or pass --overlong drop to leave such examples out")


def _median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _step_time_summary(step_seconds: List[float], schedule: List[Dict], first_step: int) -> Dict:
    """Median step time apart from the first step of the run and of each interval, and of those
    first steps after a switch on their own."""
    firsts = {e["step"] - first_step for e in schedule if "first_step_seconds" in e}
    steady = [t for i, t in enumerate(step_seconds) if i > 0 and i not in firsts]
    return {"median_step_seconds": _median(steady),
            "median_first_step_after_switch_seconds": _median([e["first_step_seconds"] for e in schedule
                                                               if "first_step_seconds" in e])}


def _device_memory_line(per_rank: List[Dict[str, int]]) -> str:
    if not any(per_rank):
        return ""
    return "GPU memory per rank (torch.cuda allocated / reserved / peak allocated): " + ", ".join(
        f"rank {r}: {format_bytes(m['allocated'])} / {format_bytes(m['reserved'])} / "
        f"{format_bytes(m['peak_allocated'])}"
        for r, m in enumerate(per_rank)) + "\n"


def _per_rank(value, world: int) -> List:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return [value]
    values: List = [None] * world
    dist.all_gather_object(values, value)
    return values


def _plots(out_dir: Path, schedule: List[Dict], num_layers: int, steps: int, first_step: int) -> str:
    """The PNGs, or a note saying why there are none; returns what the summary line names."""
    try:
        import matplotlib  # noqa: F401  (an optional dependency: the run's results matter more)
    except ImportError:
        _say("plots skipped: matplotlib is not installed (pip install matplotlib, or pass --no-plots)")
        return ""
    from lisa_dist.recipe.plots import write_plots
    write_plots(out_dir, schedule, num_layers, steps, first_step)
    return ", schedule and memory plots"


def train(run: RunConfig) -> Dict:
    from tqdm import tqdm

    from lisa_dist.recipe import checkpoints as checkpoint
    from lisa_dist.recipe import data, presets
    from lisa_dist.recipe.reporting import Reporter

    check_model_source(run.model, run.tokenizer)
    backend = BACKENDS[run.backend]
    map_large_host_blocks(backend.host_block)  # freed host blocks go back to the OS, not into glibc's heap
    data_path = Path(run.data) if run.data else presets.DEFAULT_DATA
    model, tokenizer = backend.load(run, weights_dtype(run.dtype))
    problem = tied_freeze_problem(model, run.lisa)
    if problem:
        raise ValueError(problem)
    dataset, lengths = data.tokenize_dataset(data_path, tokenizer, max_length=run.max_length, fmt=run.data_format,
                                             overlong=run.overlong)
    check_vocabulary(model, tokenizer, max([tokenizer.pad_token_id] + [max(e["input_ids"]) for e in dataset]))
    batches = data.BatchIterator(dataset, run.batch_size, run.lisa.seed, tokenizer.pad_token_id)
    runner = backend.runner(run, model, _calibration(run, batches))
    rank, world = runner.rank, runner.world_size
    num_layers = len(find_decoder_layers(model, run.lisa.layers_path).layers)
    out_dir = Path(run.output_dir)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(run.report_to, out_dir, is_main)
    if is_main:
        if lengths.over:
            _say(_length_line(lengths))
        _say(f"lisa-train: {run.model} | backend {run.backend} x{world} | {len(dataset)} examples from "
             f"{data_path} | gamma={run.lisa.activated_layers} K={run.lisa.interval_steps} "
             f"seed={run.lisa.seed} policy={run.lisa.state_policy} sampling={run.lisa.sampling}")
    # Every rank prints its own schedule line so disagreement is visible in multi-node logs too.
    _say(f"[rank {rank}/{world}] switch {runner.switch_index}: active layers {list(runner.active_layers)}")

    first_step = checkpoint.resume_for_train(runner, run)
    reporter.skip_switches_before(runner.schedule_log, first_step)
    losses: List[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=run.steps, initial=first_step, disable=not is_main or not sys.stderr.isatty(), desc="lisa",
               unit="step")
    # Optimizers create moments at a parameter's first step, so the bytes logged at a switch miss
    # the new layers'; record each interval's figure once its set has stepped.
    stepped_pending = True
    stepped_bytes: List[int] = []
    step_seconds: List[float] = []
    for step in range(first_step, run.steps):
        micro = []
        for m in range(run.grad_accum):
            batch = batches.batch(step * run.grad_accum + m, rank=rank, world_size=world)
            tokens += int(batch["attention_mask"].sum())
            micro.append(batch)
        before = runner.switch_index
        lr = runner.learning_rate()  # the step's own rate: the schedule advances inside train_step
        step_start = time.perf_counter()
        loss = runner.train_step(micro)  # loss.item() inside: the device has finished the step
        step_seconds.append(time.perf_counter() - step_start)
        if stepped_pending and step > first_step:
            # The first step of a new set runs cold: new optimizer state is allocated, and under
            # ZeRO-3 it runs without prefetch (the gather trace was invalidated by the rebuild).
            runner.schedule_log[-1]["first_step_seconds"] = step_seconds[-1]
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
        reporter.step(step + 1, loss, lr, rate, before, runner.schedule_log)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s_rank=f"{rate:.0f}", layers=list(runner.active_layers))
        bar.update(1)
        if is_main and bar.disable and ((step + 1) % run.log_every == 0 or step + 1 == run.steps):
            _say(f"step {step + 1}/{run.steps} loss {loss:.4f} tok/s/rank {rate:.0f} "
                 f"active {list(runner.active_layers)}")
        checkpoint.save_for_train(runner, run, step + 1, tokenizer)
    bar.close()
    reporter.close()
    elapsed = time.perf_counter() - start

    window = max(1, min(10, len(losses) // 5))
    summary = {
        "model": run.model, "backend": run.backend, "world_size": world, "steps": run.steps, "num_layers": num_layers,
        "lisa": run.lisa.to_dict(), "seconds": elapsed, "tokens_per_second_per_rank": tokens / elapsed,
        "loss_start": sum(losses[:window]) / window, "loss_end": sum(losses[-window:]) / window,
        "losses": losses, "schedule": runner.schedule_log,
        "optimizer_bytes_per_rank": max(stepped_bytes + [runner.optimizer_state_bytes()]),
        "optimizer_bytes_all_ranks": _per_rank(max(stepped_bytes + [runner.optimizer_state_bytes()]), world),
        "full_finetune_optimizer_bytes_per_rank": runner.full_finetune_state_bytes(),
        "step_seconds": step_seconds, **_step_time_summary(step_seconds, runner.schedule_log, first_step),
        # Per rank: torch.cuda's allocated/reserved/peak on the rank's device (empty on CPUs) and host RSS.
        "device_memory_all_ranks": _per_rank(device_memory(), world),
        "host_peak_rss_bytes_all_ranks": _per_rank(host_peak_rss_bytes(), world),
    }
    if not run.no_save:
        runner.save_pretrained(out_dir, tokenizer)
    if is_main:
        (out_dir / "lisa_log.json").write_text(json.dumps(summary, indent=1))
        plotted = "" if run.no_plots else _plots(out_dir, runner.schedule_log, num_layers, run.steps, first_step)
        ratio = summary["optimizer_bytes_per_rank"] / summary["full_finetune_optimizer_bytes_per_rank"]
        per_rank = ", ".join(f"rank {r}: {format_bytes(b)}" for r, b in enumerate(summary["optimizer_bytes_all_ranks"]))
        _say(f"\nloss {summary['loss_start']:.4f} -> {summary['loss_end']:.4f} (mean of first/last {window} steps)\n"
             f"schedule: " + ", ".join(f"step {e['step']}: {e['active_layers']}" for e in runner.schedule_log) +
             f"\noptimizer memory per rank (fp32 master + moments): {per_rank}; full fine-tuning would hold "
             f"{format_bytes(summary['full_finetune_optimizer_bytes_per_rank'])} per rank ({ratio:.2f}x)\n"
             + _device_memory_line(summary["device_memory_all_ranks"]) +
             f"{'weights and ' if not run.no_save else ''}log{plotted} in {out_dir}"
             + (f" (TensorBoard: {out_dir / 'tensorboard'})" if run.report_to == "tensorboard" else ""))
    runner.close()
    del model
    return summary


def parse_args(argv: Optional[List[str]] = None) -> RunConfig:
    return _parse_args(argv, description=__doc__)


def main(argv: Optional[List[str]] = None) -> int:
    run = parse_args(argv)
    try:
        check_model_source(run.model, run.tokenizer)
        if run.dry_run:
            from lisa_dist.recipe.plan import dry_run_report
            _say(dry_run_report(run))
            return 0
        train(run)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"lisa-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
