"""Shared by the benchmark scripts: the benchmark model's shape flags and builder, what every
result records about where it ran (CPU/GPU, visible cores, versions), and how it is written."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def machine() -> Dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus_visible": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def versions() -> Dict:
    out = {"python": platform.python_version()}
    for package in ("torch", "deepspeed", "transformers", "peft", "lisa_dist"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The benchmark model (a small Llama), its batch and the LISA knobs, identical across benchmarks
    so their rows compare."""
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=352)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--gamma", type=int, default=2)
    p.add_argument("--interval", type=int, default=5, help="K; switches are part of the timed steps")
    p.add_argument("--warmup", type=int, default=2)


def build_model(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                        intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                        max_position_embeddings=args.seq))


def optimizer_state_bytes(opt: torch.optim.Optimizer, model: torch.nn.Module) -> int:
    """fp32 masters that are not the weights themselves + optimizer state, on live tensors; for a
    LisaOptimizer its own accounting (offloaded host copies excluded)."""
    from lisa_dist.memory import local_tensor_bytes
    from lisa_dist.optim import LisaOptimizer
    if isinstance(opt, LisaOptimizer):
        b = opt.state_bytes()
        return b["master"] + b["optimizer_state"]
    weights = {p.data_ptr() for p in model.parameters()}
    tensors = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    masters = [p for g in opt.param_groups for p in g["params"] if p.data_ptr() not in weights]
    return local_tensor_bytes(tensors + masters)  # a DTensor (FSDP2) counts its local shard only


def destroy_engine(engine) -> None:
    """Free a DeepSpeed engine's optimizer and LISA state before the next row builds its own, so
    one row's memory is not counted in the next one's peak."""
    engine.destroy()
    engine.optimizer = None
    if hasattr(engine, "lisa"):
        engine.lisa = None


def write_report(out: Path, result: Dict, markdown: Callable[[Dict], str]) -> None:
    """OUT.json (the result) and OUT.md (its Markdown), which is also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text, flush=True)


def subset(text: str, allowed: Sequence[str], flag: str) -> List[str]:
    """The comma-separated choices of a benchmark flag, in `allowed`'s order; a bad one exits 2 (as argparse)."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in allowed]
    if bad or not chosen:
        print(f"{flag}: unknown {bad or 'empty list'}; choose from {', '.join(allowed)}", file=sys.stderr)
        raise SystemExit(2)
    return [s for s in allowed if s in chosen]


def launcher(name: str) -> str:
    """The `deepspeed`/`torchrun` script beside this python (a venv's), else on PATH; exits naming it if absent."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"the {name} launcher is not beside this python or on PATH; pip install deepspeed")
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a launch's --master_port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
