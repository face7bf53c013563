"""The dry run's peak per rank for Llama-3-8B on 8 GPUs: full fine-tuning, LISA and LoRA side by side.

    PYTHONPATH=. python benchmarks/llama3_8b_plan.py      # writes benchmarks/results/llama3_8b_plan.{json,md}

Every row is `lisa-train --dry-run` itself (parse_args + build_plan on the exact command line shown,
WORLD_SIZE=8) on launch/configs/llama3-8b (no weights: the config on the meta device), for DeepSpeed
ZeRO-2 and ZeRO-3 with the shipped ds_configs, sequence 2048 and 4096, micro-batch 1 and 4, gradient
checkpointing off and on: full fine-tuning, LISA gamma=2 with the embeddings and head trained (the
paper's setting) and with both frozen, and LoRA r=16 on every linear layer of the decoder.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GIB = 1024 ** 3
MODEL = "launch/configs/llama3-8b"
WORLD = 8


def command(stage: int, seq: int, batch: int, checkpointing: bool, frozen: bool) -> List[str]:
    argv = ["--dry-run", "--model", MODEL, "--backend", "deepspeed", "--deepspeed", f"ds_configs/zero{stage}.json",
            "--max-length", str(seq), "--batch-size", str(batch), "--dry-run-lora-rank", "16"]
    if checkpointing:
        argv.append("--gradient-checkpointing")
    if frozen:
        argv += ["--no-train-embeddings", "--no-train-head"]
    return argv


def row(stage: int, seq: int, batch: int, checkpointing: bool) -> Dict:
    import os

    from lisa_dist.recipe.plan import build_plan
    from lisa_dist.recipe.train import parse_args

    os.chdir(ROOT)  # the commands use repo-relative paths
    env = {"WORLD_SIZE": str(WORLD)}
    trained_cmd = command(stage, seq, batch, checkpointing, frozen=False)
    frozen_cmd = command(stage, seq, batch, checkpointing, frozen=True)
    trained = build_plan(parse_args(trained_cmd), env)
    frozen = build_plan(parse_args(frozen_cmd), env, methods=("lisa",))
    methods = {"full": trained.methods["full"].peak, "lisa": trained.methods["lisa"].peak,
               "lisa_frozen": frozen.methods["lisa"].peak, "lora": trained.methods["lora"].peak}
    out = {"stage": f"zero{stage}", "seq": seq, "batch": batch, "gradient_checkpointing": checkpointing,
           "commands": [f"WORLD_SIZE={WORLD} lisa-train " + " ".join(c) for c in (trained_cmd, frozen_cmd)],
           "methods": {k: v.to_dict() for k, v in methods.items()},
           "lisa_over_lora": methods["lisa"].peak / methods["lora"].peak,
           "lisa_frozen_over_lora": methods["lisa_frozen"].peak / methods["lora"].peak}
    return out


def markdown(result: Dict) -> str:
    lines = ["# Llama-3-8B on 8 ranks: peak per rank (GiB) from `lisa-train --dry-run`", "",
             f"Command: `{result['command']}`; each row's own dry-run commands are in the JSON "
             "(`WORLD_SIZE=8 lisa-train --dry-run --model launch/configs/llama3-8b --backend deepspeed --deepspeed "
             "ds_configs/zero{2,3}.json --max-length S --batch-size B --dry-run-lora-rank 16 "
             "[--gradient-checkpointing] [--no-train-embeddings --no-train-head]`).",
             f"Versions: {result['versions']}. Planned for GPUs (bf16 weights, fp32 masters and Adam moments); "
             "computed on the meta device, nothing measured on a GPU.", "",
             "LISA = gamma 2 with embeddings and head trained; LISA frozen = gamma 2, embeddings and head frozen; "
             "LoRA r=16 on every linear layer of the decoder. Each cell: peak (activations at the end of forward).",
             "",
             "| stage | seq | micro-batch | grad ckpt | full FT | LISA | LISA frozen | LoRA r=16 | LISA / LoRA | "
             "LISA frozen / LoRA |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        m = r["methods"]
        cells = [f"{m[k]['peak'] / GIB:.1f} ({m[k]['activations'] / GIB:.1f})"
                 for k in ("full", "lisa", "lisa_frozen", "lora")]
        ckpt = 'on' if r['gradient_checkpointing'] else 'off'
        lines.append(f"| ZeRO-{r['stage'][-1]} | {r['seq']} | {r['batch']} | {ckpt} | "
                     + " | ".join(cells) + f" | {r['lisa_over_lora']:.2f} | {r['lisa_frozen_over_lora']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llama3_8b_plan")
    args = p.parse_args(argv)
    from bench_common import machine, versions, write_report

    rows = []
    for stage, seq, batch, checkpointing in itertools.product((2, 3), (2048, 4096), (1, 4), (False, True)):
        rows.append(row(stage, seq, batch, checkpointing))
        r = rows[-1]
        print(f"zero{stage} seq {seq} mb {batch} gc {checkpointing}: LISA/LoRA {r['lisa_over_lora']:.2f}, "
              f"frozen {r['lisa_frozen_over_lora']:.2f}", flush=True)
    result = {"model": MODEL, "world_size": WORLD, "machine": machine(), "versions": versions(),
              "command": "PYTHONPATH=. python benchmarks/llama3_8b_plan.py", "rows": rows}
    write_report(args.out, result, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
