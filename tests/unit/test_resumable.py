"""lisa_dist.config.check_resumable: the one resume-compatibility check of every backend (LisaOptimizer,
and through it the single-process, DDP and FSDP2 backends; DeepSpeed's engine checkpoints). The DeepSpeed
and FSDP2 launches refuse a changed field through it too (tests/scripts/checkpoint_checks.py,
fsdp2_checks.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lisa_dist import LisaConfig, LisaOptimizer
from lisa_dist.config import NOT_RESUME_FIELDS, RESUME_FIELDS, check_resumable, resume_differences, resume_record


def test_every_lisa_config_field_is_either_compared_or_explained():
    fields = {f.name for f in dataclasses.fields(LisaConfig)}
    assert set(RESUME_FIELDS) | set(NOT_RESUME_FIELDS) == fields
    assert not set(RESUME_FIELDS) & set(NOT_RESUME_FIELDS)


@pytest.mark.parametrize("change", [
    {"activated_layers": 3}, {"interval_steps": 5}, {"seed": 1}, {"train_embeddings": False},
    {"train_head": False}, {"state_policy": "offload"}, {"sampling": "weighted", "layer_weights": [1, 1, 2, 2]},
])
def test_a_changed_layout_or_schedule_field_is_named_with_the_saved_value(change):
    saved = resume_record(LisaConfig(), 4)
    now = LisaConfig(**change)
    with pytest.raises(ValueError) as e:
        check_resumable(saved, now, 4, "ckpt/step-2")
    msg = str(e.value)
    assert msg.startswith("cannot resume from ckpt/step-2: ") and msg.endswith(", or start a new run"), msg
    for name in change:
        assert f"{name}: checkpoint {saved[name]!r} vs now " in msg, msg
        assert f"{name}={saved[name]!r}" in msg, msg  # the fix: the value to resume with


def test_fields_that_do_not_change_the_resumed_run_are_not_compared():
    saved = resume_record(LisaConfig(), 4)
    check_resumable(saved, LisaConfig(layers_path="model.layers", outlier_threshold=5.0, calibration_batches=1), 4, "x")
    # the gradient knobs only steer sampling="gradient"
    check_resumable(saved, LisaConfig(gradient_eta=2.0, exploration=0.5), 4, "x")
    gradient = resume_record(LisaConfig(sampling="gradient"), 4)
    assert resume_differences(gradient, LisaConfig(sampling="gradient", gradient_beta=0.5), 4) == [
        "gradient_beta: checkpoint 0.9 vs now 0.5"]


def test_other_layer_counts_and_caller_differences_join_the_message():
    with pytest.raises(ValueError, match=r"num_layers: checkpoint 4 vs now 6; ZeRO stage: checkpoint 2 vs now 3\. "
                                         r"Resume with the settings the checkpoint was saved with, or start"):
        check_resumable(resume_record(LisaConfig(), 4), LisaConfig(), 6, "x", ["ZeRO stage: checkpoint 2 vs now 3"])


def test_a_record_without_a_newer_field_ran_with_its_default():
    saved = resume_record(LisaConfig(), 4)
    for name in ("train_embeddings", "train_head", "sampling", "layer_weights"):
        del saved[name]
    check_resumable(saved, LisaConfig(), 4, "x")
    assert resume_differences(saved, LisaConfig(train_head=False), 4) == ["train_head: checkpoint True vs now False"]


def _tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2))


def test_lisa_optimizer_state_dicts_carry_the_record_and_refuse_another_layout():
    state = LisaOptimizer(_tiny(), LisaConfig(activated_layers=2), lr=1e-3).state_dict()
    assert {k: state["lisa"][k] for k in (*RESUME_FIELDS, "num_layers")} == resume_record(LisaConfig(), 4)
    frozen_head = LisaOptimizer(_tiny(), LisaConfig(activated_layers=2, train_head=False), lr=1e-3)
    with pytest.raises(ValueError, match="train_head: checkpoint True vs now False"):
        frozen_head.load_state_dict(state)
