"""Peak host memory per rank while lisa-train loads a sharded safetensors checkpoint, per backend.

    python benchmarks/load_memory.py        # CPU/gloo; writes benchmarks/results/load_memory.{json,md}

Writes two checkpoints with save_pretrained(max_shard_size=...): a big Llama (--hidden/--layers,
about 0.6 GB in fp32) and the tiny preset, then for each backend row launches
`torchrun --nproc_per_node N` of this script's worker at N = 1 and 2. A worker does what lisa-train
does before its first step (the backend's `load`, then its runner: FSDP2 sharding and filling, or
deepspeed.initialize) and records its peak RSS (VmHWM, reset just before loading) minus its RSS
just before. The big run minus the tiny run is what the checkpoint costs a rank; fitted as
a + b / N over the two world sizes, it predicts a rank's cost at 8 ranks for a 70B bf16 checkpoint
with both terms scaled by the size ratio (conservative for a where a is one file's transient,
which depends on max_shard_size rather than on the model's size).

Host memory is the device memory on CPU: ZeRO-1/2 need every weight on every rank's device, so
their rows cannot fall with N here (on GPUs from_pretrained puts them on the device instead).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ROWS = [  # (name, backend, deepspeed config, dtype)
    ("fsdp2 fp32", "fsdp2", None, "fp32"),
    ("fsdp2 bf16", "fsdp2", None, "bf16"),
    ("zero2 fp32", "deepspeed", "ds_configs/zero2.json", "fp32"),
    ("zero2 bf16", "deepspeed", "ds_configs/zero2.json", "bf16"),
    ("zero3 fp32", "deepspeed", "ds_configs/zero3.json", "fp32"),
    # What each rank paid before: transformers' from_pretrained of the whole model, no runner.
    ("from_pretrained fp32 (reference)", "from_pretrained", None, "fp32"),
    ("from_pretrained bf16 (reference)", "from_pretrained", None, "bf16"),
]
LLAMA2_70B_BF16_BYTES = 68_976_648_192 * 2  # launch/configs/llama2-70b, as the dry run counts it


def mib(b: float) -> str:
    """A table cell in whole MiB, the unit its column names."""
    from lisa_dist.memory import format_bytes  # imported late, like everything the workers measure around
    return format_bytes(b, "MiB", 0, suffix=False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--shard-size", default="100MB", help="save_pretrained max_shard_size")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lisa_load_memory"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_memory")
    p.add_argument("--markdown-only", action="store_true", help="re-render OUT.md from OUT.json")
    p.add_argument("--worker", nargs=4, metavar=("MODEL", "BACKEND", "DS_CONFIG", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_checkpoint(directory: Path, hidden: int, layers: int, shard_size: str) -> int:
    """A seeded Llama saved as sharded safetensors (fp32) with the shipped tokenizer; returns its bytes."""
    import torch
    import transformers

    from lisa_dist.recipe import presets

    if not (directory / "config.json").is_file():
        tok = presets.default_tokenizer()
        config = presets.tiny_llama_config(len(tok), num_layers=layers, hidden_size=hidden)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size=shard_size)
        tok.save_pretrained(directory)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def worker(args) -> None:
    """One rank: lisa-train's load and runner construction, with host memory measured around them."""
    import torch.distributed as dist
    from host_memory import host_rss_bytes, reset_peak_host_rss

    from lisa_dist.recipe.modeling import weights_dtype
    from lisa_dist.recipe.run_config import RunConfig
    from lisa_dist.recipe.train import BACKENDS

    model_dir, backend_name, ds_config, dtype = args.worker
    if backend_name == "from_pretrained":
        import transformers
        dist.init_process_group("gloo")
        before = host_rss_bytes()
        reset_peak_host_rss()
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights_dtype(dtype))
        peak = host_rss_bytes("VmHWM") - before
        result = {"rank": dist.get_rank(), "world": dist.get_world_size(), "rss_before": before, "peak_load": peak,
                  "peak": peak, "seconds": time.perf_counter() - start}
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, result)
        if dist.get_rank() == 0:
            args.result.write_text(json.dumps(values))
        del model
        dist.destroy_process_group()
        return
    run = RunConfig(model=model_dir, backend=backend_name, deepspeed=None if ds_config == "-" else ds_config,
                    dtype=dtype, steps=1, batch_size=1)
    backend = BACKENDS[backend_name]
    before = host_rss_bytes()
    reset_peak_host_rss()
    start = time.perf_counter()
    model, _ = backend.load(run, weights_dtype(dtype))
    after_load = host_rss_bytes("VmHWM")
    runner = backend.runner(run, model)
    seconds = time.perf_counter() - start
    peak = host_rss_bytes("VmHWM")
    result = {"rank": runner.rank, "world": runner.world_size, "rss_before": before,
              "peak_load": after_load - before, "peak": peak - before, "seconds": seconds}
    values: List[Dict] = [None] * runner.world_size
    dist.all_gather_object(values, result)
    if runner.rank == 0:
        args.result.write_text(json.dumps(values))
    del model
    runner.close()


def launch(model_dir: Path, backend: str, ds_config, dtype: str, world: int, result: Path) -> List[Dict]:
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from launch_util import _tool, free_port, launch_env

    cmd = [_tool("torchrun"), f"--nproc_per_node={world}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(Path(__file__).resolve()), "--worker", str(model_dir), backend, ds_config or "-", dtype,
           "--result", str(result)]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(result.read_text())


def fit(deltas: Dict[int, float]) -> Dict[str, float]:
    """a + b / N through the measured world sizes (least squares when there are more than two)."""
    import numpy as np

    worlds = sorted(deltas)
    x = np.array([[1.0, 1.0 / n] for n in worlds])
    (a, b), *_ = np.linalg.lstsq(x, np.array([deltas[n] for n in worlds]), rcond=None)
    return {"a": float(a), "b": float(b)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.markdown_only:  # re-render the Markdown from a JSON written earlier
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return 0
    from bench_common import machine, versions, write_report
    from lisa_dist.memory import format_bytes

    args.workdir.mkdir(parents=True, exist_ok=True)
    big, tiny = args.workdir / f"llama_h{args.hidden}_l{args.layers}", args.workdir / "tiny"
    sizes = {"big": write_checkpoint(big, args.hidden, args.layers, args.shard_size),
             "tiny": write_checkpoint(tiny, 128, 8, args.shard_size)}
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    for name, backend, ds_config, dtype in ROWS:
        row = {"row": name, "backend": backend, "deepspeed": ds_config, "dtype": dtype, "by_world": {}}
        for world in worlds:
            got = {which: launch(d, backend, ds_config, dtype, world, args.workdir / "result.json")
                   for which, d in (("big", big), ("tiny", tiny))}
            per_rank = [b["peak"] - t["peak"] for b, t in zip(got["big"], got["tiny"])]
            row["by_world"][world] = {"delta_peak_per_rank": per_rank,
                                      "delta_after_load_per_rank": [b["peak_load"] - t["peak_load"]
                                                                    for b, t in zip(got["big"], got["tiny"])],
                                      "raw": got}
            print(f"{name} x{world}: peak RSS over the tiny run per rank "
                  f"{', '.join(mib(d) for d in per_rank)} MiB (checkpoint {format_bytes(sizes['big'], 'MiB', 0)})",
                  flush=True)
        model_bytes = sizes["big"] * (0.5 if dtype == "bf16" else 1.0)  # what the loaded weights take
        f = fit({w: max(v["delta_peak_per_rank"]) for w, v in row["by_world"].items()})
        scale = LLAMA2_70B_BF16_BYTES / model_bytes
        row["fit"] = f
        row["predicted_70b_bf16_8_ranks_bytes"] = (f["a"] + f["b"] / 8) * scale
        rows.append(row)
    result = {"command": "python benchmarks/load_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "versions": versions(),
              "checkpoint": {"hidden": args.hidden, "layers": args.layers, "shard_size": args.shard_size,
                             "bytes": sizes["big"], "files": len(list(big.glob("*.safetensors"))),
                             "tiny_bytes": sizes["tiny"]},
              "rows": rows}
    write_report(args.out, result, markdown)
    return 0


def markdown(r: Dict) -> str:
    from lisa_dist.memory import format_bytes

    c, m, v = r["checkpoint"], r["machine"], r["versions"]
    worlds = sorted({int(w) for row in r["rows"] for w in row["by_world"]})
    head = " | ".join(f"N={w} per rank (MiB)" for w in worlds)
    lines = [
        "# Host memory while loading a sharded checkpoint",
        "",
        f"Command: `{r['command']}` (CPU, gloo, torchrun).",
        f"Machine: {m['cpu']}, {m['cpus_visible']} CPUs visible, OMP_NUM_THREADS={m['omp_num_threads']}, "
        f"{m['platform']}. Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        f"Checkpoint: Llama hidden {c['hidden']}, {c['layers']} layers, fp32, {format_bytes(c['bytes'], 'MiB', 0)} in "
        f"{c['files']} safetensors files (save_pretrained max_shard_size={c['shard_size']}); the same run on the "
        f"tiny preset's checkpoint ({format_bytes(c['tiny_bytes'], 'MiB', 1)}) is subtracted.",
        "Each figure: a rank's peak RSS from just before the backend's load to the end of its runner's "
        "construction (FSDP2 sharding and filling, deepspeed.initialize), minus the same on the tiny checkpoint.",
        "",
        f"| row | {head} | fit a + b/N (MiB) | predicted, 70B bf16 at N=8 (GiB) |",
        "|---|" + "---|" * len(worlds) + "---|---|",
    ]
    for row in r["rows"]:
        cells = " | ".join(", ".join(mib(d) for d in row["by_world"][str(w)]["delta_peak_per_rank"])
                           if str(w) in row["by_world"] else
                           ", ".join(mib(d) for d in row["by_world"][w]["delta_peak_per_rank"])
                           for w in worlds)
        f = row["fit"]
        lines.append(f"| {row['row']} | {cells} | {mib(f['a'])} + {mib(f['b'])}/N | "
                     f"{format_bytes(row['predicted_70b_bf16_8_ranks_bytes'], 'GiB', 1, suffix=False)} |")
    lines += ["", "Prediction: (a + b/8) x (70B bf16 bytes / the loaded weights' bytes); an over-estimate where a is "
              "one file's transient, which depends on max_shard_size, not on the model's size. On GPUs the "
              "ZeRO-1/2 weights and the FSDP2 shards land on the device, so their host figures there are smaller.",
              "",
              "Reading the rows: ZeRO-1/2 figures include deepspeed.initialize's fp32 state for the active "
              "layers, which the tiny run does not subtract. `from_pretrained fp32` is far below the checkpoint "
              "because transformers maps an fp32 checkpoint without copying: its pages become resident when first "
              "touched (the first forward), as page cache shared by a node's ranks, so the row undercounts. "
              "ZeRO-3's figure is nearly all there once `load` returns (`delta_after_load_per_rank` in the "
              "JSON), before deepspeed.initialize: this rank's partitions plus one file's transient "
              "(benchmarks/results/zero3_load_stages.md breaks it down by stage).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
