"""`lisa-train --dry-run` internals: world size from launcher environments, the plan's numbers, errors."""
import json
from pathlib import Path

import pytest

from lisa_dist.memory import model_state_floor
from lisa_dist.recipe.plan import build_plan, dry_run_report, resolve_world_size
from lisa_dist.recipe.train import main, parse_args
from lisa_dist.sampling import LayerSampler


@pytest.mark.parametrize("env, world, source", [
    ({"WORLD_SIZE": "16", "NNODES": "4", "NPROC_PER_NODE": "8"}, 16, "WORLD_SIZE"),
    ({"NNODES": "4", "NPROC_PER_NODE": "8"}, 32, "NNODES=4 x NPROC_PER_NODE=8"),
    ({"NPROC_PER_NODE": "2"}, 2, "nodes=1 x NPROC_PER_NODE=2"),
    ({"SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "8"}, 32, "SLURM_JOB_NUM_NODES=4 x SLURM_GPUS_ON_NODE=8"),
    ({"SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "a100:8"}, 16, "SLURM_NNODES=2 x SLURM_GPUS_PER_NODE=8"),
    ({"SLURM_JOB_NUM_NODES": "3", "NPROC_PER_NODE": "2"}, 6, "SLURM_JOB_NUM_NODES=3 x NPROC_PER_NODE=2"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, 4, "OMPI_COMM_WORLD_SIZE"),
    ({}, 1, "default"),
])
def test_world_size_from_environment(env, world, source):
    got, why = resolve_world_size(env)
    assert got == world and why.startswith(source)


def test_world_size_rejects_garbage():
    with pytest.raises(ValueError, match="NNODES='two' is not a positive integer"):
        resolve_world_size({"NNODES": "two"})


def _ds_config(tmp_path, zero):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": zero}))
    return str(path)


def test_plan_numbers_match_floor_and_sampler(tmp_path):
    args = parse_args(["--backend", "deepspeed", "--deepspeed", _ds_config(tmp_path, {"stage": 2}),
                       "--activated-layers", "3", "--interval-steps", "5", "--steps", "100", "--seed", "7"])
    plan = build_plan(args, {"WORLD_SIZE": "4"}, methods=())
    c = plan.counts
    assert plan.stage == "zero2" and plan.world_size == 4 and plan.weight_bytes == 2
    assert c.total == 1_714_304 and len(c.per_layer) == 8  # the tiny-llama preset
    assert plan.psi_active == c.always + 3 * max(c.per_layer)
    assert plan.full == model_state_floor("zero2", c.total, c.total, 4)
    assert plan.lisa == model_state_floor("zero2", c.total, plan.psi_active, 4)
    sampler = LayerSampler(8, args.lisa)
    assert plan.schedule == [(k, 5 * k, sampler.active_layers(k)) for k in range(6)]
    assert plan.intervals == 20
    report = dry_run_report(args, {"WORLD_SIZE": "4"})
    assert "world size   4 (WORLD_SIZE)" in report and "... 14 more" in report
    assert "ZeRO-2" in report.split("every stage at 4 ranks")[1].split("<- this run")[0].splitlines()[-1]


def test_offload_moves_states_to_host_in_the_report(tmp_path):
    config = _ds_config(tmp_path, {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                   "offload_param": {"device": "cpu"}})
    args = parse_args(["--backend", "deepspeed", "--deepspeed", config])
    plan = build_plan(args, {"WORLD_SIZE": "2"}, methods=())
    assert plan.offload == ("master", "optimizer_state", "weights")
    report = dry_run_report(args, {"WORLD_SIZE": "2"})
    assert "offloaded to host: fp32 master, Adam moments, bf16 weight shards" in report
    assert " on the accelerator + " in report


def test_dry_run_cli_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="ZeRO stage 0"):
        build_plan(parse_args(["--backend", "deepspeed", "--deepspeed", _ds_config(tmp_path, {"stage": 0})]), {})
    with pytest.raises(ValueError, match="activated_layers"):
        build_plan(parse_args(["--activated-layers", "9"]), {})
    assert main(["--dry-run", "--backend", "fsdp2", "--steps", "4", "--interval-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "no weights loaded" in out and "switch 1 at step 2: active layers" in out


@pytest.mark.parametrize("rank", [4, 8])
def test_lora_row_counts_what_peft_adds(tmp_path, rank):
    """The dry run's LoRA adapter count is what a real peft model at that rank trains, and its model
    states are 16 bytes per adapter parameter on top of the frozen base weights."""
    import peft
    import torch
    import transformers

    from lisa_dist.recipe import presets
    from lisa_dist.recipe.plan import lora_adapter_params

    config = presets.PRESETS["tiny-llama"](presets.default_tokenizer())
    model = transformers.AutoModelForCausalLM.from_config(config)
    base = sum(p.numel() for p in model.parameters())
    lora = peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules="all-linear", lora_dropout=0.0))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable > 0
    args = parse_args(["--backend", "single", "--dtype", "fp32", "--dry-run-lora-rank", str(rank)])
    plan = build_plan(args, {}, methods=("lora",))  # counted on the peft meta model
    assert plan.lora_params == trainable
    assert plan.counts.total == base
    with torch.device("meta"):
        assert lora_adapter_params(transformers.AutoModelForCausalLM.from_config(config), rank) == trainable
    # fp32 run: base 4 bytes/param, adapters fp32 weights + grads + Adam m, v; what peft's model holds
    # once AdamW has stepped
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad])
    ids = torch.randint(0, config.vocab_size, (1, 8))
    lora(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    held = sum(p.numel() * p.element_size() for p in lora.parameters())
    held += sum(p.grad.numel() * p.grad.element_size() for p in lora.parameters() if p.grad is not None)
    held += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert plan.lora["total"] == held
    report = dry_run_report(args, {})
    assert f"LoRA r={rank} on all linear layers but the head: {trainable:,} adapter parameters" in report
    assert any(line.startswith(f"LoRA r={rank}") for line in report.splitlines())


def test_lora_rank_must_be_positive():
    with pytest.raises(ValueError, match="--dry-run-lora-rank must be >= 1"):
        build_plan(parse_args(["--dry-run-lora-rank", "0"]), {})
    zero2 = str(Path(__file__).parents[2] / "ds_configs" / "zero2.json")
    args = parse_args(["--backend", "deepspeed", "--deepspeed", zero2])
    plan = build_plan(args, {"WORLD_SIZE": "4"}, methods=())
    assert plan.lora_rank == 8
    psi, a = plan.counts.total, plan.lora_params
    assert plan.lora["total"] == 2 * (psi + a) + (2 + 12) * a / 4  # ZeRO-2 floor of the adapters
    assert len(plan.by_stage["zero3"]) == 3


def test_dry_run_predicts_the_single_process_model_state():
    """The dry run's single-process LISA floor against the bytes SingleRunner holds at the fullest
    moment of a step (bf16 weights and gradients, fp32 masters and moments), within 10%. The
    multi-rank stages are checked the same way inside their launches (tests/scripts/*_checks.py)."""
    import sys

    import torch
    import transformers

    from lisa_dist import LisaConfig
    from lisa_dist.backends.single import SingleRunner
    from lisa_dist.memory import local_tensor_bytes
    from lisa_dist.recipe import presets

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from plan_prediction import dry_run_prediction

    torch.manual_seed(0)
    config = presets.PRESETS["tiny-llama"](presets.default_tokenizer())
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    lisa = LisaConfig(activated_layers=2, interval_steps=10, seed=0)
    runner = SingleRunner(model, lisa, lr=1e-4)
    measured = []

    def measure(*_):
        params = list(model.parameters())
        b = runner.optimizer.state_bytes()
        measured.append(local_tensor_bytes(params) + local_tensor_bytes([p.grad for p in params if p.grad is not None])
                        + b["master"] + b["optimizer_state"])

    runner.optimizer._inner.register_step_post_hook(measure)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    for _ in range(2):
        runner.train_step([{"input_ids": ids, "labels": ids}])
    predicted = dry_run_prediction(model, lisa, "single", 1)
    assert predicted["stage"] == "single"
    assert abs(measured[-1] / predicted["lisa"]["total"] - 1) <= 0.10, (measured, predicted["lisa"])
