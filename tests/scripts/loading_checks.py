"""lisa-train's FSDP2 and ZeRO-3 loading on 2 ranks, run by tests/distributed/test_loading.py under the real torchrun:

    torchrun --nproc_per_node 2 tests/scripts/loading_checks.py --workdir DIR

DIR holds the checkpoints the test wrote (`big`: sharded fp32 safetensors; `tied`: tied embeddings).
Each check goes through `BACKENDS["fsdp2"]` (meta build, fully_shard, fill) as lisa-train does and
compares the gathered weights with from_pretrained / the single-process preset build, bit for bit;
`zero3` does the same through `BACKENDS["deepspeed"].load` with a ZeRO-3 config (built partitioned,
each rank writing its partitions from the files). `rss` / `zero3` are measured around the load
(and, for FSDP2, the runner's construction), after the same load of the small checkpoint (so
imports and set-up are not counted). Every
rank writes DIR/rank<r>.json; a failed check raises, so the rank exits non-zero.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.host_memory import host_rss_bytes, reset_peak_host_rss  # noqa: E402
from lisa_dist.backends.deepspeed import process_group  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402
from lisa_dist.recipe.modeling import build_model_and_tokenizer  # noqa: E402
from lisa_dist.recipe.run_config import RunConfig  # noqa: E402
from lisa_dist.recipe.train import BACKENDS  # noqa: E402

torch.set_num_threads(1)


def load_fsdp2(model: str, dtype: torch.dtype):
    run = RunConfig(model=model, backend="fsdp2", dtype="bf16" if dtype == torch.bfloat16 else "fp32", steps=1,
                    warmup_steps=0)
    built, _ = BACKENDS["fsdp2"].load(run, dtype)
    return BACKENDS["fsdp2"].runner(run, built)


def mismatches(sharded, reference) -> Dict[str, List[str]]:
    """Parameters and buffers whose gathered values differ from the reference in any bit."""
    ref = dict(reference.named_parameters())
    bad = [n for n, p in sharded.named_parameters() if not torch.equal(p.full_tensor(), ref[n].detach())]
    ref_buffers = dict(reference.named_buffers())
    # shard_model casts bf16 models (buffers included) the way the whole-model path always has.
    bad_buffers = [n for n, b in sharded.named_buffers() if not torch.equal(b, ref_buffers[n].to(b.dtype))]
    return {"params": bad, "buffers": bad_buffers, "checked": len(ref)}


def check_rss_and_bits(workdir: Path) -> Dict:
    big = workdir / "big"
    # The same load of a small checkpoint first: imports, process-group and FSDP2 set-up would
    # otherwise count as loading (the benchmark subtracts a tiny-model run the same way).
    load_fsdp2(str(workdir / "tied"), torch.float32).close()
    gc.collect()
    before = host_rss_bytes()
    reset_peak_host_rss()
    runner = load_fsdp2(str(big), torch.float32)
    peak = host_rss_bytes("VmHWM") - before
    local = sum(p.to_local().numel() * p.element_size() for p in runner.model.parameters())
    reference = transformers.AutoModelForCausalLM.from_pretrained(big, dtype=torch.float32)
    out = {"peak_rss_delta": peak, "local_shard_bytes": local,
           "checkpoint_bytes": sum(p.stat().st_size for p in big.glob("*.safetensors")),
           "files": len(list(big.glob("*.safetensors"))), "fp32": mismatches(runner.model, reference)}
    del reference
    runner.close()
    gc.collect()
    return out


def check_tied_bf16(workdir: Path) -> Dict:
    tied = workdir / "tied"
    runner = load_fsdp2(str(tied), torch.bfloat16)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tied, dtype=torch.bfloat16)
    out = {"bf16": mismatches(runner.model, reference),
           "tied": runner.model.lm_head.weight is runner.model.model.embed_tokens.weight,
           "reference_tied": reference.lm_head.weight is reference.model.embed_tokens.weight,
           "dtype": str(next(runner.model.parameters()).dtype)}
    runner.close()
    return out


def check_preset(seed: int) -> Dict:
    run = RunConfig(model="tiny-llama", backend="fsdp2", dtype="fp32", lisa=LisaConfig(seed=seed), steps=1,
                    warmup_steps=0)
    built, _ = BACKENDS["fsdp2"].load(run, torch.float32)
    runner = BACKENDS["fsdp2"].runner(run, built)
    reference, _ = build_model_and_tokenizer("tiny-llama", torch.float32, seed=seed)
    out = mismatches(runner.model, reference)
    runner.close()
    return out


def load_zero3(model: str, dtype: torch.dtype, config: Path):
    run = RunConfig(model=model, backend="deepspeed", deepspeed=str(config), batch_size=1,
                    dtype="bf16" if dtype == torch.bfloat16 else "fp32", steps=1, warmup_steps=0)
    built, _ = BACKENDS["deepspeed"].load(run, dtype)
    return built


def zero3_mismatches(partitioned, reference) -> Dict[str, List[str]]:
    """As `mismatches`, for a ZeRO-3 model: each parameter gathered on its own (collective)."""
    import deepspeed

    ref = dict(reference.named_parameters())
    bad = []
    for name, p in partitioned.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if not torch.equal(p.detach(), ref[name].detach()):
                bad.append(name)
    ref_buffers = dict(reference.named_buffers())
    bad_buffers = [n for n, b in partitioned.named_buffers() if not torch.equal(b, ref_buffers[n])]
    return {"params": bad, "buffers": bad_buffers, "checked": len(ref)}


def check_zero3(workdir: Path) -> Dict:
    """Peak RSS of lisa-train's ZeRO-3 load of `big`, and its weights and those of `tied` in bf16
    against from_pretrained. The references are built first: while a partitioned model lives,
    transformers builds every model under zero.Init."""
    config = workdir / "zero3.json"
    if dist.get_rank() == 0:
        config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}))
    dist.barrier()
    big, tied = workdir / "big", workdir / "tied"
    ref_big = transformers.AutoModelForCausalLM.from_pretrained(big, dtype=torch.float32)
    ref_tied = transformers.AutoModelForCausalLM.from_pretrained(tied, dtype=torch.bfloat16)
    small = load_zero3(str(tied), torch.float32, config)  # the warm-up load, as check_rss_and_bits does
    del small
    gc.collect()
    before = host_rss_bytes()
    reset_peak_host_rss()
    model = load_zero3(str(big), torch.float32, config)
    peak = host_rss_bytes("VmHWM") - before
    out = {"peak_rss_delta": peak, "checkpoint_bytes": sum(p.stat().st_size for p in big.glob("*.safetensors")),
           "partition_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters()),
           "all_partitioned": all(p.numel() == 0 for p in model.parameters()),
           "fp32": zero3_mismatches(model, ref_big)}
    del model
    gc.collect()
    model = load_zero3(str(tied), torch.bfloat16, config)
    out["tied_bf16"] = {"bf16": zero3_mismatches(model, ref_tied),
                        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
                        "dtype": str(next(model.parameters()).dtype)}
    del model, ref_big, ref_tied
    gc.collect()
    return out


def check_gloo_all_gather() -> Dict:
    """_compat.gloo_all_gather_in_place against torch's all_gather_into_tensor on this gloo group: equal
    results for dtypes, odd sizes, a subgroup, async handles, and the input already being this rank's slice
    of the output (how ZeRO-3 calls it); DeepSpeed's all-gathers routed to it; and the peak RSS a gather into a
    64 MiB output adds (gloo's own all-gather receives into a second output-sized tensor)."""
    import deepspeed.comm as ds_dist
    from deepspeed.comm import comm as ds_comm

    from lisa_dist.backends.deepspeed._compat import gloo_all_gather_in_place

    rank, world = dist.get_rank(), dist.get_world_size()
    subgroup = dist.new_group(list(range(world)))
    unequal = []
    for dtype, n, group, async_op in ((torch.float32, 1000, None, False), (torch.bfloat16, 7, None, True),
                                      (torch.int64, 33, subgroup, False), (torch.float16, 4096, subgroup, True)):
        torch.manual_seed(rank)
        inp = (torch.randn(n) * 100).to(dtype)
        expected = torch.empty(n * world, dtype=dtype)
        dist.all_gather_into_tensor(expected, inp, group=group)
        got = torch.full((n * world,), -1).to(dtype)
        work = gloo_all_gather_in_place(got, inp, group=group, async_op=async_op)
        if async_op:
            work.wait()
        aliased = torch.zeros(n * world, dtype=dtype)
        aliased.narrow(0, rank * n, n).copy_(inp)
        gloo_all_gather_in_place(aliased, aliased.narrow(0, rank * n, n), group=group)
        via_deepspeed = torch.zeros(n * world, dtype=dtype)
        ds_dist.all_gather_into_tensor(via_deepspeed, inp, group=group)
        for what, t in (("in_place", got), ("aliased", aliased), ("deepspeed", via_deepspeed)):
            if not torch.equal(t, expected):
                unequal.append(f"{what} {dtype} n={n} async={async_op}")
    big = 64 * 1024 ** 2 // 4 // world
    inp, out = torch.ones(big), torch.zeros(big * world)
    dist.barrier()
    reset_peak_host_rss()
    before = host_rss_bytes()
    gloo_all_gather_in_place(out, inp)
    added = host_rss_bytes("VmHWM") - before
    dist.destroy_process_group(subgroup)
    return {"unequal": unequal, "routed": bool(getattr(ds_comm.cdb.all_gather_function, "_lisa_in_place", False)),
            "peak_added": added, "output_bytes": out.numel() * 4, "gathered_ok": bool((out == 1).all())}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    process_group.ensure_initialized()  # DeepSpeed's start (gloo here), shared with FSDP2's checks
    results = {"rss": check_rss_and_bits(args.workdir), "tied_bf16": check_tied_bf16(args.workdir),
               "preset": check_preset(seed=3), "zero3": check_zero3(args.workdir),
               "gloo_all_gather": check_gloo_all_gather()}
    (args.workdir / f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
