"""The two DeepSpeed bugs lisa_dist's _compat.py works around before 0.19, shown on plain DeepSpeed
engines (no LISA), with the workaround off and on. 2 CPU ranks (gloo), inside a release's venv
from .ci/matrix.sh:

    V=~/.cache/lisa_release_matrix/deepspeed-0.18; TORCH_EXTENSIONS_DIR=$V/torch_extensions \
        $V/bin/deepspeed --num_gpus 2 benchmarks/ds_release_fixes.py --bug gather --fix off      # and --fix on
    V=~/.cache/lisa_release_matrix/deepspeed-0.17; TORCH_EXTENSIONS_DIR=$V/torch_extensions \
        $V/bin/deepspeed --num_gpus 2 benchmarks/ds_release_fixes.py --bug accumulation --fix off   # and --fix on

- gather (0.16-0.18, ZeRO-3): GatheredParameters over every parameter, repeated; counts the gathers
  whose weights differ from the first (_compat.install_zero3_gather_fix).
- accumulation (0.17, ZeRO-2): 4 fp32 steps of 2 micro-batches with torch's AdamW against
  single-process AdamW on the same global batches, and against AdamW on the last micro-batch of
  each step only (_compat.install_zero2_accumulation_fix).
Rank 0 prints one JSON line (machine, versions, result).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "scripts"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from zero3_checks import ds3_config, gathered_weights  # noqa: E402
from zero12_checks import (  # noqa: E402
    ADAMW,
    BETAS,
    EPS,
    LR,
    MB,
    WD,
    build_model,
    ds_config,
    flat_weights,
    global_batch,
    rank_micro_batches,
)

from bench_common import machine, versions  # noqa: E402
from lisa_dist.backends.deepspeed import _compat  # noqa: E402
from lisa_dist.backends.deepspeed.process_group import release_shm_segments  # noqa: E402

TORCH_ADAMW = {"type": "AdamW", "params": dict(ADAMW, torch_adam=True)}


def gather(times: int) -> dict:
    import deepspeed
    model = build_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds3_config(False, 1, TORCH_ADAMW))
    first = gathered_weights(engine.module)
    differing = sum(not torch.equal(gathered_weights(engine.module), first) for _ in range(times))
    engine.destroy()
    return {"gathers": times, "differing": differing}


def accumulation(steps: int = 4, gas: int = 2) -> dict:
    import deepspeed
    model = build_model()
    start = flat_weights(model)

    def adamw_on(rows: slice):
        ref = copy.deepcopy(model)
        opt = torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        for step in range(steps):
            ids = global_batch(step, gas)[rows]
            ref(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        return flat_weights(ref)

    per_micro = dist.get_world_size() * MB
    every, last = adamw_on(slice(None)), adamw_on(slice((gas - 1) * per_micro, gas * per_micro))
    with _compat.zero12_build_fixes():  # 2 ranks fail before 0.19 without it, LISA or not
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=ds_config(2, False, gas, optimizer=TORCH_ADAMW))
    for step in range(steps):
        for ids in rank_micro_batches(step, gas):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
    got = flat_weights(engine.module)
    engine.destroy()
    return {"steps": steps, "gradient_accumulation_steps": gas,
            "mean_abs_diff_vs_adamw_on_every_micro_batch": (got - every).abs().mean().item(),
            "mean_abs_diff_vs_adamw_on_last_micro_batch_only": (got - last).abs().mean().item(),
            "mean_abs_update": (every - start).abs().mean().item()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bug", choices=("gather", "accumulation"), required=True)
    p.add_argument("--fix", choices=("on", "off"), required=True)
    p.add_argument("--gathers", type=int, default=200)
    p.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = p.parse_args()
    import deepspeed
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    release_shm_segments()
    if args.fix == "on":
        (_compat.install_zero3_gather_fix if args.bug == "gather" else _compat.install_zero2_accumulation_fix)()
    result = gather(args.gathers) if args.bug == "gather" else accumulation()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if dist.get_rank() == 0:
        print(json.dumps({"bug": args.bug, "fix": args.fix, "world_size": dist.get_world_size(),
                          "per_rank": everyone, "machine": machine(), "versions": versions()}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
