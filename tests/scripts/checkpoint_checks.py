"""LISA-aware DeepSpeed checkpoints, run by tests/distributed/test_checkpoint.py under the real launcher:

    deepspeed --num_gpus 2 tests/scripts/checkpoint_checks.py --phase train --out /tmp/x
    deepspeed --num_gpus 2 tests/scripts/checkpoint_checks.py --phase resume --out /tmp/x

`train`: for each ZeRO stage, N steps straight, saving with engine.save_checkpoint at a switch
boundary, mid-interval and at the end; records the final weights and the engine's logits. The model
has attention dropout, so the torch generator's state is part of what must resume; python's and
numpy's generators are drawn from right after each save.
`resume`: in new processes, a fresh engine (other random init, other generator states) loads each
checkpoint, trains to N and must end bit-identical to the straight run, and its python/numpy draws
must repeat the straight run's; the same resume with the torch generator disturbed after the load
must not be bit-identical (the dropout is live); then engines with another gamma / seed / model must
get a ValueError. Failed checks raise, so the rank exits non-zero; OUT/resume_rank<r>.json records
what was compared.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import builders  # noqa: E402
import lisa_dist.backends.deepspeed as lds  # noqa: E402
from builders import tiny_llama  # noqa: E402
from ds_common import close  # noqa: E402
from lisa_dist.config import LisaConfig  # noqa: E402

torch.set_num_threads(1)

VOCAB, SEQ, MB = 128, 12, 2
STEPS, K = 8, 3
SAVE_AT = {3: "boundary", 4: "mid"}  # step 3 = K: saved right after the switch to interval 1
# ZeRO-1 with reset, ZeRO-2 with offload (host slices must travel through the checkpoint too).
STAGES = {1: "reset", 2: "offload", 3: "offload"}
SEED = 3  # interval 2 re-samples a layer parked in interval 0, so offload's host slice matters
DROPOUT = 0.2


def build_model(layers: int = 6, init_seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(layers, 32, seed=init_seed, vocab=VOCAB, max_positions=32, tie_word_embeddings=False,
                      attention_dropout=DROPOUT)


def ds_config(stage: int) -> dict:
    return builders.ds_config(stage, MB, clip=1.0,
                              optimizer={"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
                              scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3,
                                                                        "warmup_num_steps": 5}})


def lisa(stage: int, **over) -> LisaConfig:
    return LisaConfig(**{"activated_layers": 2, "interval_steps": K, "seed": SEED, "state_policy": STAGES[stage],
                         **over})


def engine_for(stage: int, layers: int = 6, init_seed: int = 0, **over):
    engine, _, _, _ = lds.initialize(model=build_model(layers, init_seed), config=ds_config(stage),
                                     lisa=lisa(stage, **over))
    return engine


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + step)
    rows = torch.randint(0, VOCAB, (dist.get_world_size() * MB, SEQ), generator=g)
    r = dist.get_rank()
    return rows[r * MB:(r + 1) * MB]


def train_step(engine, step: int) -> None:
    ids = batch(step)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def flat(engine) -> torch.Tensor:
    import deepspeed
    params = list(engine.module.parameters())
    # ZeRO-3 params are empty placeholders outside a gather (a no-op for stage 1/2).
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().flatten().clone() for p in params])


def probe_logits(engine) -> torch.Tensor:
    ids = torch.arange(SEQ).unsqueeze(0) % VOCAB
    engine.module.eval()
    with torch.no_grad():
        out = engine.module(input_ids=ids).logits
    engine.module.train()
    return out


def host_draws() -> list:
    """Python's and numpy's next numbers; training draws from neither, so they only match after a
    resume if the checkpoint carried those generators."""
    return [random.random(), float(np.random.random())]


def dropout_is_live(engine) -> bool:
    ids = batch(0)
    with torch.no_grad():
        a, b = (engine.module(input_ids=ids).logits for _ in range(2))
    return not torch.equal(a, b)


def phase_train(out: Path) -> dict:
    result = {}
    for stage in STAGES:
        save_dir = out / f"zero{stage}"
        # Another process's generators differ: each rank its own, each stage's run its own.
        rank = int(os.environ["RANK"])  # the process group comes up with the first engine
        random.seed(100 * stage + rank)
        np.random.seed(100 * stage + 10 + rank)
        engine = engine_for(stage)
        draws = {}
        for step in range(STEPS):
            train_step(engine, step)
            if step + 1 in SAVE_AT:
                engine.save_checkpoint(save_dir, tag=f"step{step + 1}", client_state={"step": step + 1})
                draws[step + 1] = host_draws()
        engine.save_checkpoint(save_dir, tag="final", client_state={"step": STEPS})
        torch.save(flat(engine), out / f"zero{stage}_straight_rank{dist.get_rank()}.pt")
        logits = probe_logits(engine)  # on every rank: a ZeRO-3 forward gathers collectively
        if dist.get_rank() == 0:
            torch.save(logits, out / f"zero{stage}_logits.pt")
        (out / f"zero{stage}_draws_rank{dist.get_rank()}.json").write_text(json.dumps(draws))
        result[f"zero{stage}"] = {"schedule": [[e["step"], e["active_layers"]] for e in engine.lisa.schedule_log],
                                  "latest": (save_dir / "latest").read_text(),
                                  "host_layers": sorted(map(str, engine.lisa.host or {})),
                                  "dropout_live": dropout_is_live(engine)}
        close(engine)
    return result


def expect_value_error(fn, *needles: str) -> str:
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        assert all(n in msg for n in needles), f"ValueError lacks {needles}: {msg}"
        return msg
    raise AssertionError(f"no ValueError (expected one mentioning {needles})")


def phase_resume(out: Path) -> dict:
    result = {}
    rank = int(os.environ["RANK"])  # the process group comes up with the first engine
    for stage in STAGES:
        save_dir = out / f"zero{stage}"
        straight = torch.load(out / f"zero{stage}_straight_rank{rank}.pt", weights_only=True)
        draws = json.loads((out / f"zero{stage}_draws_rank{rank}.json").read_text())
        for k, kind in SAVE_AT.items():
            random.seed(999)
            np.random.seed(999)
            engine = engine_for(stage, init_seed=1)  # other weights: everything must come from the checkpoint
            path, client = engine.load_checkpoint(save_dir, tag=f"step{k}")
            assert client["step"] == k and "lisa" not in client, client
            got = host_draws()
            assert got == draws[str(k)], f"zero{stage} resume at {k}: python/numpy draws {got} vs saved {draws[str(k)]}"
            lisa_state = engine.lisa
            assert lisa_state.optimizer_steps == k and lisa_state.switch_index == k // K, (
                lisa_state.optimizer_steps, lisa_state.switch_index)
            assert lisa_state.active_layers == lisa_state.sampler.active_layers(k // K)
            for step in range(k, STEPS):
                train_step(engine, step)
            final = flat(engine)
            diff = (final - straight).abs().max().item()
            assert torch.equal(final, straight), f"zero{stage} resume at {k} ({kind}): max diff {diff}"
            result[f"zero{stage}_resume_{kind}"] = {"step": k, "bit_identical": True, "max_abs_diff": diff,
                                                    "host_draws_match": True,
                                                    "schedule": [[e["step"], e["active_layers"]]
                                                                 for e in lisa_state.schedule_log]}
            close(engine)
        # Control: the same resume with the torch generator moved on after the load must differ,
        # or the bit-identical resumes above would say nothing about the dropout masks.
        k = max(SAVE_AT)
        engine = engine_for(stage, init_seed=1)
        engine.load_checkpoint(save_dir, tag=f"step{k}")
        torch.manual_seed(12345)
        for step in range(k, STEPS):
            train_step(engine, step)
        disturbed = (flat(engine) - straight).abs().max().item()
        assert disturbed > 0, f"zero{stage}: a resume with another torch generator state ended bit-identical"
        result[f"zero{stage}_disturbed_rng_max_abs_diff"] = disturbed
        close(engine)
        # tag=None follows `latest` (the final checkpoint)
        engine = engine_for(stage, init_seed=1)
        engine.load_checkpoint(save_dir)
        assert torch.equal(flat(engine), straight), f"zero{stage}: latest did not load the final checkpoint"
        close(engine)

    stage = max(STAGES)
    save_dir = out / f"zero{stage}"
    errors = {}
    for name, make, needles in (
            ("gamma", lambda: engine_for(stage, activated_layers=3), ("activated_layers", "checkpoint 2 vs now 3")),
            ("seed", lambda: engine_for(stage, seed=SEED + 1), ("seed",)),
            ("interval", lambda: engine_for(stage, interval_steps=K + 1), ("interval_steps",)),
            ("model", lambda: engine_for(stage, layers=4), ("model", "num_layers: checkpoint 6 vs now 4")),
            ("head", lambda: engine_for(stage, train_head=False), ("train_head: checkpoint True vs now False",
                                                                   "LisaConfig train_head=True"))):
        engine = make()
        errors[name] = expect_value_error(lambda: engine.load_checkpoint(save_dir, tag="step4"), *needles)
        close(engine)
    result["mismatch_errors"] = errors
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=("train", "resume"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="1:reset,2:offload,3:offload", help="ZeRO stage:state policy pairs")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    STAGES.clear()
    STAGES.update({int(a): b for a, b in (pair.split(":") for pair in args.stages.split(","))})
    out = Path(args.out)
    result = phase_train(out) if args.phase == "train" else phase_resume(out)
    (out / f"{args.phase}_rank{dist.get_rank()}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
