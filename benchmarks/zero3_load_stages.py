"""Where ZeRO-3 loading's host memory goes, stage by stage, and what each part of the loader saves.

    python benchmarks/zero3_load_stages.py   # CPU/gloo, 2 ranks; writes benchmarks/results/zero3_load_stages.{json,md}

For each variant, one `torchrun --nproc_per_node 2` of this script's worker runs lisa-train's ZeRO-3
load (`lisa_dist.backends.deepspeed.loading.load_partitioned` with the recipe's build from the config and
the checkpoint's files) on benchmarks/load_memory.py's big checkpoint, then on its tiny one, and
records each rank's RSS and peak RSS (VmHWM, reset at each mark) after the process group starts,
after the build under zero.Init and after the fill. The variants switch off the loader's three
parts one at a time, and all together (what the loader did before):
- `mapped`: large host blocks get their own mappings while loading (memory.large_host_blocks_mapped);
- `no init`: transformers' random init of the ZeRO-3 model, gathered module by module, is skipped
  (hf_compat.zero3_weight_init_skipped);
- `own partitions`: each rank writes its partitions from its slice of each tensor; without it every
  parameter is gathered, written on rank 0 from the whole tensor and re-partitioned.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from host_memory import host_rss_bytes, reset_peak_host_rss  # noqa: E402

PARTS = ("mapped", "no_init", "own_partitions")
VARIANTS = {  # name -> the parts switched off
    "lisa_dist": (),
    "without mapped": ("mapped",),
    "without no init": ("no_init",),
    "without own partitions": ("own_partitions",),
    "without all three (before)": PARTS,
}
STAGES = ("built", "filled")


def mib(b: float) -> str:
    """A table cell in whole MiB, the unit its column names."""
    from lisa_dist.memory import format_bytes  # imported late, like everything the workers measure around
    return format_bytes(b, "MiB", 0, suffix=False)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--shard-size", default="100MB")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lisa_load_memory"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "zero3_load_stages")
    p.add_argument("--markdown-only", action="store_true", help="re-render OUT.md from OUT.json")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "OFF"), help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def status() -> Dict[str, int]:
    return {key: host_rss_bytes(key) for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from lisa_dist import memory
    from lisa_dist.backends.deepspeed import _compat, loading, process_group
    from lisa_dist.integrations import hf_compat
    from lisa_dist.recipe.ds_config import resolve_ds_config
    from lisa_dist.recipe.modeling import build_from_config_and_tokenizer, checkpoint_files
    from lisa_dist.recipe.run_config import RunConfig

    model_dir, off = args.worker
    off = [] if off == "-" else off.split(",")
    if "mapped" in off:
        memory.large_host_blocks_mapped = lambda: nullcontext()
    if "no_init" in off:
        hf_compat.zero3_weight_init_skipped = lambda: nullcontext()
    if "own_partitions" in off:
        _compat.zero3_partition_writable = lambda param: False  # every parameter takes the gather path
    marks: Dict[str, Dict[str, int]] = {}

    def mark(name: str) -> None:
        marks[name] = status()
        reset_peak_host_rss()

    process_group.ensure_initialized()
    mark("process group")
    run = RunConfig(model=model_dir, backend="deepspeed", deepspeed=str(ROOT / "ds_configs" / "zero3.json"),
                    dtype="fp32", steps=1, batch_size=1)
    fill = loading._fill_from_files

    def marked_fill(model, files):
        mark("built")
        fill(model, files)

    loading._fill_from_files = marked_fill
    model, _ = loading.load_partitioned(resolve_ds_config(run, torch.float32),
                                        lambda: build_from_config_and_tokenizer(model_dir, torch.float32),
                                        None, checkpoint_files(model_dir))
    mark("filled")
    result = {"marks": marks, "partition_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size()
                                                     for p in model.parameters())}
    everyone: List[Dict] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if dist.get_rank() == 0:
        args.result.write_text(json.dumps(everyone))
    del model
    dist.barrier()
    dist.destroy_process_group()


def launch(model_dir: Path, off, result: Path) -> List[Dict]:
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from launch_util import _tool, free_port, launch_env

    cmd = [_tool("torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           str(Path(__file__).resolve()), "--worker", str(model_dir), ",".join(off) or "-", "--result", str(result)]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(result.read_text())


def stage_figures(ranks: List[Dict]) -> List[Dict[str, int]]:
    """Per rank and stage: the peak during the stage and the RSS after it, above the process group's RSS."""
    out = []
    for r in ranks:
        base = r["marks"]["process group"]["VmRSS"]
        row = {"partition": r["partition_bytes"]}
        for stage in STAGES:
            row[f"{stage} peak"] = r["marks"][stage]["VmHWM"] - base
            row[f"{stage} rss"] = r["marks"][stage]["VmRSS"] - base
        out.append(row)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.markdown_only:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.out.with_suffix(".json").read_text())))
        return 0
    from load_memory import write_checkpoint

    from bench_common import machine, versions, write_report
    from lisa_dist.memory import format_bytes

    args.workdir.mkdir(parents=True, exist_ok=True)
    big, tiny = args.workdir / f"llama_h{args.hidden}_l{args.layers}", args.workdir / "tiny"
    size = write_checkpoint(big, args.hidden, args.layers, args.shard_size)
    write_checkpoint(tiny, 128, 8, args.shard_size)
    rows = []
    for name, off in VARIANTS.items():
        got = {which: stage_figures(launch(d, off, args.workdir / "stages.json")) for which, d in
               (("big", big), ("tiny", tiny))}
        rows.append({"variant": name, "off": list(off), **got})
        print(name, [{k: format_bytes(v, "MiB", 0) for k, v in r.items()} for r in got["big"]], flush=True)
    result = {"command": "python benchmarks/zero3_load_stages.py "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "versions": versions(),
              "checkpoint": {"hidden": args.hidden, "layers": args.layers, "shard_size": args.shard_size, "bytes": size,
                             "files": len(list(big.glob("*.safetensors")))},
              "rows": rows}
    write_report(args.out, result, markdown)
    return 0


def markdown(r: Dict) -> str:
    from lisa_dist.memory import format_bytes

    c, m, v = r["checkpoint"], r["machine"], r["versions"]
    cols = ["built peak", "built rss", "filled peak", "filled rss"]
    lines = [
        "# ZeRO-3 loading, stage by stage",
        "",
        f"Command: `{r['command']}` (CPU, gloo, torchrun, 2 ranks, ds_configs/zero3.json at fp32).",
        f"Machine: {m['cpu']}, {m['cpus_visible']} CPUs visible, OMP_NUM_THREADS={m['omp_num_threads']}, "
        f"{m['platform']}. Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        f"Checkpoint: Llama hidden {c['hidden']}, {c['layers']} layers, fp32, {format_bytes(c['bytes'], 'MiB', 0)} in "
        f"{c['files']} safetensors files (max_shard_size={c['shard_size']}). Figures in MiB per rank (rank 0, "
        "rank 1): RSS above the RSS once the process group is up, minus the same on the tiny checkpoint. `peak` "
        "is the highest RSS during the stage; `built` is construction under zero.Init (and transformers' "
        "random init where not skipped); `filled` is writing the partitions from the files. Each rank's "
        "partitions: " + ", ".join(mib(b['partition'] - t['partition']) for b, t in
                                   zip(r["rows"][0]["big"], r["rows"][0]["tiny"])) + " MiB.",
        "",
        "| variant | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for row in r["rows"]:
        cells = [", ".join(mib(b[col] - t[col]) for b, t in zip(row["big"], row["tiny"])) for col in cols]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    lines += ["", "`without ...` switches one part of the loader off (the module docstring says what each "
              "does); `without all three` is the loader as it was before them.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
