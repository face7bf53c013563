"""LisaOptimizer: the single-process reference every backend is compared with."""
import contextlib
import copy

import pytest
import torch
from live_tensors import live_tensor_bytes
from transformers import LlamaConfig, LlamaForCausalLM

from lisa_dist import LisaConfig, vocab_rows
from lisa_dist.optim import LisaOptimizer

VOCAB = 64


def tiny_llama(dtype=torch.float32, layers=6, seed=0, tied=False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).to(dtype)


def batch(step, size=4, length=12, high=VOCAB):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, high, (size, length), generator=g)
    return {"input_ids": ids, "labels": ids}


def train(model, opt, steps, start=0, on_step=None):
    for s in range(start, start + steps):
        model(**batch(s)).loss.backward()
        opt.step()
        opt.zero_grad()
        if on_step:
            on_step(s)


def layer_of(opt, p):
    for i, layer in enumerate(opt.split.per_layer):
        if any(q is p for _, q in layer):
            return i
    return None


def test_only_active_set_trains_and_holds_state():
    model = tiny_llama(torch.bfloat16)
    cfg = LisaConfig(activated_layers=2, interval_steps=2, seed=3)
    opt = LisaOptimizer(model, cfg, lr=1e-2)
    seen = set()

    def check(step):
        active = set(opt.active_layers)
        seen.add(opt.active_layers)
        always = {id(p) for p in opt.split.always_params}
        for name, p in model.named_parameters():
            i = layer_of(opt, p)
            trained = id(p) in always or i in active
            assert p.requires_grad == trained, name
            assert (p in opt._masters) == trained, name
        masters = set(map(id, opt._masters.values()))
        assert all(id(m) in masters for m in opt.state), "optimizer state for a non-owned tensor"
        assert all(m.dtype == torch.float32 for m in opt._masters.values())
        group_layers = {layer_of(opt, p) for p in opt._masters if id(opt._masters[p]) in
                        {id(t) for t in opt.param_groups[1]["params"]}}
        assert group_layers == active

    check(-1)
    train(model, opt, 12, on_step=check)
    assert opt.switch_index == 6 and len(seen) > 2
    assert opt.active_layers == opt.sampler.active_layers(6)


def test_frozen_layers_bit_identical_and_weights_follow_masters():
    model = tiny_llama(torch.bfloat16)
    opt = LisaOptimizer(model, LisaConfig(activated_layers=2, interval_steps=3, seed=1), lr=1e-2)
    for k in range(4):
        active = opt.active_layers
        frozen = {n: p.detach().clone() for n, p in model.named_parameters()
                  if layer_of(opt, p) is not None and layer_of(opt, p) not in active}
        moving = {n: p.detach().clone() for n, p in model.named_parameters() if layer_of(opt, p) in active}
        train(model, opt, 3, start=3 * k)
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n], t) for n, t in frozen.items())
        assert any(not torch.equal(params[n], t) for n, t in moving.items())
        for p, m in opt._masters.items():
            if layer_of(opt, p) is None:  # always-active: weight is the bf16 rounding of its master
                assert torch.equal(p, m.to(torch.bfloat16))


def test_matches_plain_adamw_over_one_interval():
    cfg = LisaConfig(activated_layers=2, interval_steps=5, seed=2)
    model = tiny_llama()
    ref = copy.deepcopy(model)
    opt = LisaOptimizer(model, cfg, lr=1e-2, weight_decay=0.1)
    active = opt.active_layers
    ref_split = LisaOptimizer(copy.deepcopy(ref), cfg).split  # same structure, for names only
    names = {n for n, _ in ref_split.always} | {n for i in active for n, _ in ref_split.per_layer[i]}
    for n, p in ref.named_parameters():
        p.requires_grad_(n in names)
    ref_opt = torch.optim.AdamW([p for n, p in ref.named_parameters() if n in names], lr=1e-2, weight_decay=0.1)
    train(model, opt, 5)
    train(ref, ref_opt, 5)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=n)
    assert opt.switch_index == 1


@pytest.mark.parametrize("policy", ["reset", "offload"])
def test_state_bytes_flat_over_200_switches(policy):
    model = tiny_llama(torch.bfloat16, layers=8)
    opt = LisaOptimizer(model, LisaConfig(activated_layers=2, interval_steps=1, seed=5, state_policy=policy), lr=1e-3)
    train(model, opt, 2)
    masters = opt.state_bytes()["master"]
    # AdamW creates moments lazily at a layer's first step: bounded by the active set, never more.
    state_bound = sum(2 * m.numel() * 4 + 4 for m in opt._masters.values())
    live = []
    for s in range(2, 202):
        train(model, opt, 1, start=s)
        b = opt.state_bytes()
        assert b["master"] == masters and b["optimizer_state"] <= state_bound
        if s % 50 == 0:
            live.append(live_tensor_bytes())
    assert opt.switch_index == 202
    per_layer = 4 * 3 * sum(p.numel() for _, p in opt.split.per_layer[0])
    # A leak of one layer's state per switch would add 200 layers' worth; allow one layer of noise.
    assert max(live) - min(live) <= per_layer, live
    if policy == "offload":  # host copies: at most every inactive layer, never more
        step_counters = 4 * len(opt.split.per_layer[0])
        assert b["offloaded_host"] <= (per_layer + step_counters) * (opt.split.num_layers - 2)


def test_optimizer_state_is_that_of_the_active_set_not_all_layers():
    model = tiny_llama(torch.bfloat16, layers=8)
    opt = LisaOptimizer(model, LisaConfig(activated_layers=2, interval_steps=2), lr=1e-3)
    train(model, opt, 21)  # mid-interval: every active layer has stepped once since the switch
    psi_a = sum(p.numel() for p in opt.split.always_params) + 2 * sum(p.numel() for _, p in opt.split.per_layer[0])
    b = opt.state_bytes()
    # + a 0-dim fp32 step per tensor
    assert b["master"] == 4 * psi_a and b["optimizer_state"] == 8 * psi_a + 4 * len(opt._masters)
    full = sum(p.numel() for p in model.parameters())
    assert b["master"] + b["optimizer_state"] < 0.8 * 12 * full


def test_offload_restores_exact_moments():
    model = tiny_llama(torch.bfloat16, layers=4)
    opt = LisaOptimizer(model, LisaConfig(activated_layers=1, interval_steps=1, seed=11, state_policy="offload"),
                        lr=1e-2)
    snapshots = {}
    restored = 0
    prev_active = ()
    for s in range(40):
        for i in opt.active_layers:
            if i in snapshots and i not in prev_active:
                for _, p in opt.split.per_layer[i]:
                    m, st = snapshots[i][id(p)]
                    assert torch.equal(opt._masters[p], m)
                    assert st.keys() == opt.state[opt._masters[p]].keys()
                    for k in st:
                        assert torch.equal(st[k], opt.state[opt._masters[p]][k]), (i, k)
                restored += 1
        prev_active = opt.active_layers
        train(model, opt, 1, start=s)
        for i in prev_active:  # snapshot after the step that ended the layer's interval
            if i not in opt.active_layers:
                snapshots[i] = {id(p): (opt._offloaded[i][n][0].clone(),
                                        {k: v.clone() for k, v in opt._offloaded[i][n][1].items()})
                                for n, p in opt.split.per_layer[i]}
    assert restored >= 5


def test_reset_starts_fresh_moments():
    model = tiny_llama(torch.bfloat16, layers=4)
    opt = LisaOptimizer(model, LisaConfig(activated_layers=1, interval_steps=1, seed=11), lr=1e-2)
    prev_active = ()
    fresh = 0
    for s in range(20):
        for i in set(opt.active_layers) - set(prev_active):
            fresh += 1
            for _, p in opt.split.per_layer[i]:
                assert not opt.state[opt._masters[p]], "re-sampled layer kept moments under reset"
                assert torch.equal(opt._masters[p], p.float())
        prev_active = opt.active_layers
        train(model, opt, 1, start=s)
    assert fresh >= 10


@pytest.mark.parametrize("policy,embedding_update", [("reset", "dense"), ("offload", "dense"), ("reset", "rows")])
@pytest.mark.parametrize("split_at", [6, 7])  # at a switch boundary, and mid-interval
def test_state_dict_round_trip_resumes_bit_identical(policy, embedding_update, split_at, tmp_path):
    # rows: 40 slots for 64 tokens, so the slot table fills up and is part of what must resume
    cfg = LisaConfig(activated_layers=2, interval_steps=3, seed=9, state_policy=policy,
                     embedding_update=embedding_update, embedding_rows=40)
    total = 13

    def new():
        model = tiny_llama(torch.bfloat16, tied=embedding_update == "rows")
        opt = LisaOptimizer(model, cfg, lr=1e-2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        return model, opt, sched

    def run(model, opt, sched, steps, start):
        for s in range(start, start + steps):
            with pytest.warns(UserWarning, match="slots are all taken") if s == 1 and cfg.embedding_update == "rows" \
                    else contextlib.nullcontext():
                loss = model(**batch(s)).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    model, opt, sched = new()
    run(model, opt, sched, total, 0)

    m1, o1, s1 = new()
    run(m1, o1, s1, split_at, 0)
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict(), "sched": s1.state_dict()}, tmp_path / "ck.pt")
    del m1, o1, s1
    m2, o2, s2 = new()
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    s2.load_state_dict(ck["sched"])
    assert o2.optimizer_steps == split_at
    run(m2, o2, s2, total - split_at, split_at)

    assert o2.active_layers == opt.active_layers and o2.switch_index == opt.switch_index
    for (n, a), (_, b) in zip(model.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n
    for (n, a), (_, b) in zip(model.named_buffers(), m2.named_buffers()):
        assert torch.equal(a, b), n
    assert o2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_load_state_dict_rejects_other_schedule():
    model = tiny_llama()
    sd = LisaOptimizer(model, LisaConfig(activated_layers=2, seed=1), lr=1e-3).state_dict()
    other = LisaOptimizer(tiny_llama(), LisaConfig(activated_layers=3, seed=1), lr=1e-3)
    with pytest.raises(ValueError, match="activated_layers: checkpoint 2 vs now 3"):
        other.load_state_dict(sd)


def test_lr_scheduler_and_no_always_active():
    model = tiny_llama()
    opt = LisaOptimizer(model, LisaConfig(activated_layers=1, interval_steps=2, train_embeddings=False,
                                          train_head=False), lr=1.0)
    assert opt.param_groups[0]["params"] == []
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    train(model, opt, 4, on_step=lambda s: sched.step())
    assert all(g["lr"] == 0.5 ** 4 for g in opt.param_groups)
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad


# --- embedding_update="rows" ------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_rows_gradient_is_the_dense_gradient_of_the_fed_rows(tied):
    model = tiny_llama(tied=tied)
    ref = copy.deepcopy(model)
    opt = LisaOptimizer(model, LisaConfig(activated_layers=1, embedding_update="rows", embedding_rows=48), lr=1e-2)
    rows = model.lisa_vocab_rows
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert not embed.requires_grad and not head.requires_grad
    deltas = [rows.embed] if tied else [rows.embed, rows.head]
    assert [p for p in opt.split.always_params if p.dim() == 2] == deltas  # one delta for a tied weight
    b = batch(0, high=40)  # tokens 40..63 are never fed
    out = model(**b)
    out.loss.backward()
    for p in ref.parameters():
        p.requires_grad_(True)
    ref_out = ref(**b)
    ref_out.loss.backward()
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=0, atol=0)  # zero deltas change nothing
    n = rows.used()
    fed = rows.rows[:n]
    assert n == b["input_ids"].unique().numel() and set(fed.tolist()) == set(b["input_ids"].unique().tolist())
    # tied: the delta collects both the embedding's and the head's gradient, as the shared weight does
    torch.testing.assert_close(rows.embed.grad[:n], ref.model.embed_tokens.weight.grad[fed])
    if not tied:
        torch.testing.assert_close(rows.head.grad[:n], ref.lm_head.weight.grad[fed])
    assert all(torch.count_nonzero(d.grad[n:]) == 0 for d in deltas)


@pytest.mark.parametrize("tied", [False, True])
def test_rows_train_only_fed_rows_and_merge_into_a_plain_model(tied, tmp_path):
    model = tiny_llama(tied=tied)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = LisaOptimizer(model, LisaConfig(activated_layers=2, interval_steps=2, seed=4, embedding_update="rows",
                                          embedding_rows=48), lr=1e-2)
    for k in range(3):
        frozen = {n: p.detach().clone() for n, p in model.named_parameters()
                  if layer_of(opt, p) is not None and layer_of(opt, p) not in opt.active_layers}
        for s in range(2 * k, 2 * k + 2):
            model(**batch(s, high=40)).loss.backward()
            opt.step()
            opt.zero_grad()
        params = dict(model.named_parameters())
        assert all(torch.equal(params[n], t) for n, t in frozen.items())
    rows = model.lisa_vocab_rows
    n = rows.used()
    assert 0 < n <= 40
    for name in ("model.embed_tokens.weight", "lm_head.weight"):  # the vocabulary matrices never move
        if name in weights:
            assert torch.equal(dict(model.named_parameters(remove_duplicate=False))[name], weights[name])
    assert torch.count_nonzero(rows.embed[:n]) > 0 and torch.count_nonzero(rows.embed[n:]) == 0
    always_state = sum(t.numel() for p in opt.split.always_params for t in opt.state[opt._masters[p]].values())
    # two moments of each delta (48 x 32, not 64 x 32) and of the final norm, and a step counter each
    assert always_state == 2 * (48 * 32 * (1 if tied else 2) + 32) + len(opt.split.always_params)

    # Export: the deltas folded into a plain checkpoint (what every runner's save_pretrained writes).
    merged = vocab_rows.merged_state_dict(model, model.state_dict())
    assert not any(k.startswith(vocab_rows.MODULE_NAME) for k in merged)
    model.save_pretrained(tmp_path, state_dict=merged)
    plain = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert not hasattr(plain, vocab_rows.MODULE_NAME)
    fed = rows.rows[:n]
    for name in ("model.embed_tokens.weight",) + (() if tied else ("lm_head.weight",)):
        changed = (dict(plain.named_parameters())[name] != weights[name]).any(dim=1).nonzero().flatten()
        assert set(changed.tolist()) == set(fed.tolist())  # every fed row moved, no other
    probe = batch(99)  # includes tokens 40..63, which never trained: they keep their pretrained rows
    with torch.no_grad():
        torch.testing.assert_close(plain(**probe).logits, model(**probe).logits, rtol=1e-5, atol=1e-5)


def test_rows_scaled_embeddings_match_the_dense_gradient():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    model = Gemma3ForCausalLM(cfg)
    assert float(model.model.embed_tokens.embed_scale) != 1.0
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = copy.deepcopy(model)
    LisaOptimizer(model, LisaConfig(activated_layers=1, embedding_update="rows"), lr=1e-3)
    b = batch(0)
    model(**b).loss.backward()
    ref.model.embed_tokens.weight.requires_grad_(True)
    ref(**b).loss.backward()
    rows = model.lisa_vocab_rows
    n = rows.used()
    torch.testing.assert_close(rows.embed.grad[:n], ref.model.embed_tokens.weight.grad[rows.rows[:n]])


def test_rows_refuses_an_embedding_that_is_not_a_lookup():
    model = tiny_llama()
    model.model.embed_tokens.register_forward_hook(lambda m, a, out: out + 1.0)  # e.g. a positional term inside
    LisaOptimizer(model, LisaConfig(activated_layers=1, embedding_update="rows"), lr=1e-3)
    with pytest.raises(ValueError, match="row delta cannot be added"):
        model(**batch(0))


def test_tied_dense_embeddings_hold_one_state():
    model = tiny_llama(tied=True)
    opt = LisaOptimizer(model, LisaConfig(activated_layers=1), lr=1e-3)
    train(model, opt, 1)
    tied = model.model.embed_tokens.weight
    assert [id(p) for p in opt.split.always_params].count(id(tied)) == 1
    assert sum(1 for m in opt.state if m is tied) == 1 and len(opt.state) == len(opt._masters)


def test_rows_refuses_the_engines_it_does_not_run_on():
    from lisa_dist.deepspeed import initialize
    from lisa_dist.integrations.accelerate import LisaPrepared

    lisa = LisaConfig(activated_layers=1, embedding_update="rows")
    with pytest.raises(ValueError, match=r"does not run on LisaCallback .*It runs on LisaOptimizer .*ZeRO stage 1 or 2"
                       r".*--embedding-update dense"):
        LisaPrepared(lisa)
    zero3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(ValueError, match=r"does not run on DeepSpeed ZeRO-3: .*It runs on LisaOptimizer"):
        initialize(model=tiny_llama(), config=zero3, lisa=lisa)


def test_rows_config_and_flags():
    from lisa_dist.recipe.run_config import parse_args

    run = parse_args(["--embedding-update", "rows", "--embedding-rows", "100"])
    assert run.lisa.embedding_update == "rows" and run.lisa.embedding_rows == 100
    assert parse_args([]).lisa.embedding_update == "dense"
    with pytest.raises(ValueError, match="embedding_update must be one of"):
        LisaConfig(embedding_update="sparse")
    with pytest.raises(ValueError, match="embedding_rows must be >= 1"):
        LisaConfig(embedding_rows=0)
