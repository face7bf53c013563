"""Importance-weighted sampling in the core: the gradient statistics, OwLore outlier ratios and
exact resume of LisaOptimizer under every sampling mode (the distributed checks are batched into
tests/scripts/{zero12,zero3,fsdp2}_checks.py)."""
import copy
import io
import json
import math

import pytest
import torch
from test_optim import batch, tiny_llama

from lisa_dist import LisaConfig
from lisa_dist.importance import LayerImportance, det_exp
from lisa_dist.optim import LisaOptimizer
from lisa_dist.outlier import linears, outlier_ratios
from lisa_dist.sampling import LayerSampler


def test_det_exp_matches_exp_and_is_pinned():
    for i in range(2000):
        x = -i * 0.37
        assert det_exp(x) == pytest.approx(math.exp(x), rel=1e-12, abs=0.0), x  # a few ulps, from k * ln2
    assert det_exp(0.0) == 1.0 and det_exp(-800.0) == 0.0
    # basic IEEE operations only: these bits are the same on every platform
    assert det_exp(-1.0).hex() == "0x1.78b56362cef39p-2"
    assert det_exp(-10.5).hex() == "0x1.cdfc263f6a0b6p-16"


def _gradient(num_layers=6, gamma=2, **over):
    cfg = LisaConfig(activated_layers=gamma, interval_steps=1, sampling="gradient", **over)
    return LayerSampler(num_layers, cfg), LayerImportance(num_layers, cfg)


def test_gradient_mode_visits_every_layer_before_weighted_draws():
    sampler, imp = _gradient(num_layers=7, gamma=2)
    seen, history = set(), []
    for k in range(4):  # 7 layers, 2 at a time: three intervals of unvisited ones, then 1 forced + 1 drawn
        active = imp.draw(sampler, k)
        history.append(active)
        if k < 3:
            assert not set(active) & seen, history
        else:
            assert (set(range(7)) - seen) <= set(active), history
        seen |= set(active)
        imp.observe(active, [float(i + 1) for i in active])
    assert seen == set(range(7))
    imp.draw(sampler, 4)
    assert all(e is not None for e in imp.ema)
    p = imp.probabilities
    assert sum(p) == pytest.approx(1.0) and min(p) >= 0.1 / 7 - 1e-15
    # larger gradient norms, larger probability; the floor keeps the smallest above eps / N
    assert list(p) == sorted(p)


def test_gradient_moving_average_and_probabilities_by_hand():
    sampler, imp = _gradient(num_layers=3, gamma=1, gradient_beta=0.5, gradient_eta=2.0, exploration=0.3)
    for k, g2 in enumerate([[4.0, 2.0], [1.0], [3.0, 3.0]]):
        active = imp.draw(sampler, k)
        for x in g2:
            imp.observe(active, [x])
        layer = active[0]
        assert imp.pending == {layer: sum(g2)} and imp.pending_steps == len(g2)
    imp.close_interval()
    # three intervals visited three distinct layers (exploration), each seeded by its interval mean
    assert sorted(imp.ema) == [1.0, 3.0, 3.0]
    ema = imp.ema
    mean = sum(ema) / 3
    q = [math.exp(2.0 * (e / mean - max(ema) / mean)) for e in ema]
    want = [0.7 * x / sum(q) + 0.1 for x in q]
    imp.draw(sampler, 3)
    assert imp.probabilities == pytest.approx(want, rel=1e-14)
    # a layer trained again folds its new interval mean in with beta
    layer = imp.draw(sampler, 4)[0]
    before = imp.ema[layer]
    imp.observe((layer,), [10.0])
    imp.close_interval()
    assert imp.ema[layer] == 0.5 * before + 0.5 * 10.0


def test_importance_state_round_trips_exactly():
    sampler, imp = _gradient(num_layers=5, gamma=2)
    for k in range(6):
        active = imp.draw(sampler, k)
        imp.observe(active, [0.1 * (i + 1) + k / 3 for i in active])
    imp.observe(imp.draw(sampler, 6), [1 / 3, 2 / 7])  # mid-interval: pending holds one step
    import json
    other = _gradient(num_layers=5, gamma=2)[1]
    other.load_state_dict(json.loads(json.dumps(imp.state_dict())))
    assert other.state_dict() == imp.state_dict()
    assert [other.draw(sampler, k) for k in range(7, 12)] == [imp.draw(sampler, k) for k in range(7, 12)]
    with pytest.raises(ValueError, match="sampling='gradient'"):
        LayerImportance(5, LisaConfig(activated_layers=2)).load_state_dict(imp.state_dict())


# --- OwLore outlier ratios -------------------------------------------------------------------------

def _reference_ratios(model, batches, threshold):
    """Brute force from full matrices: hooks collect X, then A = |W| * ||X_j|| per linear."""
    blocks = list(model.model.layers)
    xs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: xs.setdefault(mod, []).append(
        inp[0].detach().reshape(-1, inp[0].shape[-1]).double())) for b in blocks for m in linears(b)]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"])
    for h in hooks:
        h.remove()
    out = []
    for b in blocks:
        scores = [(m.weight.detach().double().abs() * torch.cat(xs[m]).norm(dim=0)[None, :]).flatten()
                  for m in linears(b)]
        a = torch.cat(scores)
        out.append((a > threshold * a.mean()).sum().item() / a.numel())
    return out


def _planted(layer=3, layers=6):
    model = tiny_llama(layers=layers)
    with torch.no_grad():
        # a few input channels with outsized weights, where the inputs are large (after the norm):
        # the OwLore signature of an important layer
        model.model.layers[layer].self_attn.q_proj.weight[:, :3] *= 40.0
    return model


def test_planted_outlier_layer_ranks_first_and_matches_the_formula():
    model = _planted()
    batches = [batch(200 + i) for i in range(3)]
    for m in (13.0, 5.0):
        got = outlier_ratios(list(model.model.layers), lambda b: model(input_ids=b["input_ids"]), batches, m)
        want = _reference_ratios(model, batches, m)
        assert got == pytest.approx(want, abs=1e-12)
        assert max(range(6), key=lambda i: got[i]) == 3 and got[3] > 1.5 * sorted(got)[-2], (m, got)
    # M=13 (OwLore's): only the planted layer has outliers, so it is the only one ever drawn
    opt = LisaOptimizer(model, LisaConfig(activated_layers=1, interval_steps=1, sampling="outlier"), lr=1e-3,
                        calibration=batches)
    assert opt.importance.probabilities == (0.0, 0.0, 0.0, 1.0, 0.0, 0.0)
    assert [opt.sampler.active_layers(k, opt.importance.outlier_ratios) for k in range(20)] == [(3,)] * 20


def test_outlier_mode_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="needs calibration batches"):
        LisaOptimizer(model, LisaConfig(sampling="outlier"), lr=1e-3)
    # a random init has no weights 13x above the mean: a clear error, not a silent uniform draw
    with pytest.raises(ValueError, match="lower LisaConfig.outlier_threshold"):
        LisaOptimizer(model, LisaConfig(sampling="outlier"), lr=1e-3, calibration=[batch(0)])


# --- exact resume under every mode ---------------------------------------------------------------

MODES = {
    "weighted": dict(sampling="weighted", layer_weights=[1.0, 0.0, 2.0, 3.0, 0.5, 1.0]),
    "outlier": dict(sampling="outlier", outlier_threshold=5.0),
    "gradient": dict(sampling="gradient", state_policy="offload"),
}


def _run(mode, model, steps, start=0, opt=None):
    cfg = LisaConfig(activated_layers=2, interval_steps=3, seed=4, **MODES[mode])
    if opt is None:
        opt = LisaOptimizer(model, cfg, lr=1e-2, calibration=[batch(300), batch(301)])
    for s in range(start, start + steps):
        model(**batch(s)).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("mode", sorted(MODES))
def test_resume_mid_interval_bit_identical(mode):
    base = _planted() if mode == "outlier" else tiny_llama()
    straight_model = copy.deepcopy(base)
    straight = _run(mode, straight_model, 14)

    first_model = copy.deepcopy(base)
    first = _run(mode, first_model, 7)  # K=3: step 7 is inside interval 2
    assert first.optimizer_steps % 3 != 0
    buf = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "opt": first.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    # a new process: other initial weights, the saved ones loaded, then the optimizer state
    resumed_model = tiny_llama(seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = _run(mode, resumed_model, 0)
    resumed.load_state_dict(saved["opt"])
    assert resumed.importance.state_dict() == first.importance.state_dict()
    _run(mode, resumed_model, 7, start=7, opt=resumed)

    for (n, a), (_, b) in zip(straight_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), n
    assert resumed.importance.state_dict() == straight.importance.state_dict()
    assert resumed.active_layers == straight.active_layers
    if mode == "gradient":
        assert all(e is not None for e in straight.importance.ema)


def test_resume_refuses_another_sampling_mode():
    model = tiny_llama()
    state = _run("gradient", model, 2).state_dict()
    opt = LisaOptimizer(tiny_llama(), LisaConfig(activated_layers=2, interval_steps=3, seed=4,
                                                 state_policy="offload"), lr=1e-2)
    with pytest.raises(ValueError, match="sampling: checkpoint 'gradient' vs now 'uniform'"):
        opt.load_state_dict(state)
    # a checkpoint written before sampling existed reads as uniform
    old = opt.state_dict()
    for key in ("sampling", "layer_weights", "importance"):
        del old["lisa"][key]
    opt.load_state_dict(old)


# --- dry run and lisa-train flags ------------------------------------------------------------------

def test_dry_run_prints_the_known_switches_of_each_mode():
    from lisa_dist.recipe.plan import build_plan, dry_run_report
    from lisa_dist.recipe.train import parse_args

    weights = "1,0,2,3,0,1,1,5"
    args = parse_args(["--sampling", "weighted", "--layer-weights", weights, "--interval-steps", "5", "--steps", "50"])
    plan = build_plan(args, {})
    sampler = LayerSampler(8, args.lisa)
    assert plan.schedule == [(k, 5 * k, sampler.active_layers(k)) for k in range(6)]
    assert all(not {1, 4} & set(layers) for _, _, layers in plan.schedule)
    assert "sampling weighted" in dry_run_report(args, {})

    args = parse_args(["--sampling", "gradient", "--steps", "200"])
    plan = build_plan(args, {})
    seen = [i for _, _, layers in plan.schedule for i in layers]
    assert len(plan.schedule) == 4 and sorted(seen) == list(range(8))  # each layer once, then data decides
    assert "data-dependent from switch 4 on" in dry_run_report(args, {})

    args = parse_args(["--sampling", "outlier"])
    assert build_plan(args, {}).schedule == []
    assert "data-dependent: drawn with probabilities proportional to each layer's outlier ratio" in \
        dry_run_report(args, {})


@pytest.mark.parametrize("argv, message", [
    (["--sampling", "weighted"], "needs layer_weights"),
    (["--sampling", "weighted", "--layer-weights", "1,1"], "has 2 entries but the model has 8 decoder layers"),
    (["--layer-weights", "1,2"], "--layer-weights is only used with sampling=\"weighted\""),
    (["--sampling", "weighted", "--layer-weights", "1,x"], "expected comma-separated numbers"),
    (["--sampling", "weighted", "--layer-weights", "1,-1,1,1,1,1,1,1"], "weights must be >= 0"),
])
def test_cli_sampling_errors_exit_2(argv, message, capsys):
    from lisa_dist.recipe.train import main
    try:
        code = main(["--dry-run", *argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_lisa_train_gradient_and_outlier_modes(tmp_path, capsys):
    from lisa_dist.recipe.train import main
    common = ["--steps", "6", "--interval-steps", "2", "--batch-size", "2", "--max-length", "32", "--no-save",
              "--log-every", "100"]
    assert main(common + ["--sampling", "gradient", "--output-dir", str(tmp_path / "g")]) == 0
    log = json.loads((tmp_path / "g" / "lisa_log.json").read_text())
    assert log["lisa"]["sampling"] == "gradient"
    switches = [e["active_layers"] for e in log["schedule"]]
    assert len(switches) == 4 and len({i for s in switches[:4] for i in s}) == 8
    assert main(common + ["--sampling", "outlier", "--output-dir", str(tmp_path / "o")]) == 0
    log = json.loads((tmp_path / "o" / "lisa_log.json").read_text())
    assert log["lisa"]["sampling"] == "outlier" and len(log["schedule"]) == 4


def test_agreement_fingerprint_covers_the_probability_vector():
    import hashlib

    from lisa_dist.agreement import _fingerprint
    # uniform sampling: the fingerprint every earlier release gathered
    old = int.from_bytes(hashlib.sha256(b"3:1,4").digest()[:8], "little") >> 1
    assert _fingerprint(3, (1, 4)) == old == _fingerprint(3, (1, 4), None)
    p = [0.25, 0.25, 0.5]
    q = [0.25, 0.25000000000000006, 0.49999999999999994]  # one ulp apart
    assert _fingerprint(3, (1, 4), p) != old
    assert _fingerprint(3, (1, 4), p) != _fingerprint(3, (1, 4), q)
    assert _fingerprint(3, (1, 4), p) == _fingerprint(3, (1, 4), list(p))
