"""In-process checks of the integration layer: per-option-set groups in LisaOptimizer, the probes
of lisa_dist.integrations.hf_compat, and LisaCallback's input errors."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from version_checks import forget_version_checks

from lisa_dist import LisaConfig, LisaOptimizer
from lisa_dist.integrations import hf_compat


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, attention_bias=True))


def decay_split(model, wd=0.1):
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and "norm" not in n)]
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


def train(model, opt, steps=6):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_one_option_set_in_groups_is_the_plain_optimizer_bit_for_bit():
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=4)
    a, b = tiny(), tiny()
    plain = LisaOptimizer(a, lisa, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    grouped = LisaOptimizer(b, lisa, torch.optim.AdamW, groups=decay_split(b, wd=0.1), lr=1e-3, weight_decay=0.0)
    assert len(plain.param_groups) == 2 and len(grouped.param_groups) == 4
    train(a, plain)
    c = tiny()
    same = LisaOptimizer(c, lisa, torch.optim.AdamW, groups=[{"params": list(c.parameters())}],
                         lr=1e-3, weight_decay=0.1)
    train(c, same)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    train(b, grouped)
    # the no-decay set really differs: biases and norm weights end elsewhere than with decay on them
    names = dict(b.named_parameters())
    assert any(not torch.equal(p, names[n]) for n, p in a.named_parameters() if "norm" in n)


def test_no_decay_group_keeps_weight_decay_zero_across_switches():
    lisa = LisaConfig(activated_layers=1, interval_steps=1, seed=0)
    model = tiny()
    opt = LisaOptimizer(model, lisa, torch.optim.AdamW, groups=decay_split(model, wd=0.5), lr=0.0)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n or n.endswith("bias")}
    train(model, opt, steps=4)  # lr 0: only decoupled weight decay could move anything, and it is lr-scaled
    for group in opt.param_groups[1::2]:
        assert group["weight_decay"] == 0.0
    for n, p in model.named_parameters():
        if n in norms:
            assert torch.equal(p, norms[n]), n
    sets = len(opt.param_groups) // 2
    active = opt.param_groups[sets:]
    assert sum(len(g["params"]) for g in active) == sum(
        1 for _ in model.model.layers[opt.active_layers[0]].parameters())


def test_from_optimizer_takes_class_defaults_and_groups():
    model = tiny()
    base = torch.optim.AdamW(decay_split(model, wd=0.2), lr=3e-4, betas=(0.8, 0.9))
    opt = LisaOptimizer.from_optimizer(model, LisaConfig(activated_layers=1, interval_steps=2), base)
    assert isinstance(opt._inner, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0, 0.2, 0.0]
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    # a state dict round trip (what accelerate does when it wraps the optimizer) keeps the layout
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0, 0.2, 0.0]


def test_groups_with_a_foreign_parameter_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="not a parameter of the model"):
        LisaOptimizer(model, LisaConfig(activated_layers=1), groups=[{"params": [torch.nn.Parameter(torch.zeros(1))]}])


def test_probes_pass_here_and_name_a_missing_private_api(monkeypatch):
    import transformers.trainer

    from lisa_dist import versions
    forget_version_checks()
    hf_compat.check()
    forget_version_checks()
    monkeypatch.delattr(transformers.trainer, "save_fsdp_optimizer")
    with pytest.raises(versions.IncompatibleReleaseError, match=r"transformers\.trainer\.save_fsdp_optimizer"):
        hf_compat.check()
    forget_version_checks()


def test_callback_needs_a_lisa_config():
    from lisa_dist.integrations.hf import LisaCallback
    with pytest.raises(ValueError, match="LisaConfig"):
        LisaCallback({"activated_layers": 2})


def test_fsdp2_prepare_keeps_groups_by_parameter_name():
    # Sharding replaces every parameter tensor: the groups must survive as names.
    from lisa_dist.integrations.accelerate import _groups_by_name
    model = tiny()
    opt = torch.optim.AdamW(decay_split(model, wd=0.1), lr=1e-3)
    groups = _groups_by_name(model, opt)
    names = dict(model.named_parameters())
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [[names[n] for n in g["params"]] for g in groups] == [g["params"] for g in opt.param_groups]
    foreign = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(ValueError, match="not parameters of the model"):
        _groups_by_name(model, foreign)
