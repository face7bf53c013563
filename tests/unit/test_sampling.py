import collections

import pytest

from lisa_dist import LayerSampler, LisaConfig, sample_layers

# Pinned: a change here changes every user's schedule and breaks resume of old checkpoints.
GOLDEN_SEED0_32_2 = [(3, 11), (22, 31), (4, 27), (14, 19)]
GOLDEN_SEED42_80_8 = [(11, 22, 35, 39, 51, 69, 72, 78), (10, 28, 33, 56, 58, 60, 71, 72)]


def test_deterministic_and_well_formed():
    s = LayerSampler(32, LisaConfig(activated_layers=4, seed=7))
    for k in range(50):
        a = s.active_layers(k)
        assert a == s.active_layers(k) == LayerSampler(32, LisaConfig(activated_layers=4, seed=7)).active_layers(k)
        assert len(a) == 4 and len(set(a)) == 4 and list(a) == sorted(a)
        assert all(0 <= i < 32 for i in a)


def test_seed_and_switch_change_the_set():
    sets = {sample_layers(seed, k, 32, 2) for seed in range(3) for k in range(20)}
    assert len(sets) > 40


def test_uniform_frequency():
    n, gamma, switches = 16, 3, 8000
    s = LayerSampler(n, LisaConfig(activated_layers=gamma, seed=1))
    counts = collections.Counter(i for k in range(switches) for i in s.active_layers(k))
    expected = switches * gamma / n
    # 5 sigma of a binomial(switches, gamma/n) count
    sigma = (switches * gamma / n * (1 - gamma / n)) ** 0.5
    assert all(abs(counts[i] - expected) < 5 * sigma for i in range(n)), counts
    pairs = collections.Counter(s.active_layers(k)[:2] for k in range(switches))
    assert len(pairs) > 50


def test_golden_values():
    assert [sample_layers(0, k, 32, 2) for k in range(4)] == GOLDEN_SEED0_32_2
    assert [sample_layers(42, k, 80, 8) for k in range(2)] == GOLDEN_SEED42_80_8
    assert sample_layers(3, 1000, 4, 4) == (0, 1, 2, 3)


def test_bad_gamma_and_interval():
    with pytest.raises(ValueError, match="activated_layers"):
        LisaConfig(activated_layers=0)
    with pytest.raises(ValueError, match="interval_steps"):
        LisaConfig(interval_steps=0)
    with pytest.raises(ValueError, match="only 4 decoder layers"):
        LayerSampler(4, LisaConfig(activated_layers=5))
    with pytest.raises(ValueError, match="state_policy"):
        LisaConfig(state_policy="keep")
    with pytest.raises(ValueError, match="unknown LisaConfig field"):
        LisaConfig.from_dict({"gamma": 2})


# --- weighted sampling (sampling="weighted" / "outlier" / "gradient") ------------------------------

from lisa_dist.sampling import sample_weighted  # noqa: E402

# Pinned like the uniform ones: these are what every rank and every resumed run draws.
GOLDEN_WEIGHTED_SEED0 = [(2, 7), (6, 7), (3, 6), (2, 5)]
GOLDEN_WEIGHTED_SEED42_32_4 = [(2, 3, 8, 21), (4, 9, 17, 26)]
WEIGHTS8 = [1, 0, 2, 3, 0, 1, 1, 5]


def test_weighted_golden_values():
    assert [sample_weighted(0, k, 8, 2, WEIGHTS8) for k in range(4)] == GOLDEN_WEIGHTED_SEED0
    assert [sample_weighted(42, k, 32, 4, [float(i % 5) for i in range(32)]) for k in range(2)] == \
        GOLDEN_WEIGHTED_SEED42_32_4
    assert sample_weighted(1, 3, 6, 3, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], forced=(4,)) == (3, 4, 5)
    # the config route is the same function
    s = LayerSampler(8, LisaConfig(sampling="weighted", layer_weights=WEIGHTS8, seed=0))
    assert [s.active_layers(k) for k in range(4)] == GOLDEN_WEIGHTED_SEED0


def test_uniform_schedule_untouched_by_the_new_modes():
    s = LayerSampler(32, LisaConfig(activated_layers=2, seed=0, sampling="uniform"))
    assert [s.active_layers(k) for k in range(4)] == GOLDEN_SEED0_32_2


def test_weighted_is_a_pure_function_of_its_inputs():
    w = [0.5, 1.5, 0.0, 2.0, 1.0, 3.0]
    a = [sample_weighted(9, k, 6, 2, w) for k in range(30)]
    assert a == [sample_weighted(9, k, 6, 2, list(w)) for k in range(30)]
    # scaling the weights by a power of two is the same distribution and, exactly, the same draws
    assert a == [sample_weighted(9, k, 6, 2, [x * 4 for x in w]) for k in range(30)]
    assert a != [sample_weighted(10, k, 6, 2, w) for k in range(30)]
    for k, layers in enumerate(a):
        assert len(set(layers)) == 2 and list(layers) == sorted(layers) and 2 not in layers


def _inclusion_gamma2(w):
    """Exact P(layer i drawn) for two successive draws without replacement."""
    total = sum(w)
    return [w[i] / total + sum(w[j] / total * w[i] / (total - w[j]) for j in range(len(w)) if j != i)
            for i in range(len(w))]


@pytest.mark.parametrize("gamma", [1, 2])
def test_weighted_frequencies_follow_the_weights_and_zero_is_never_drawn(gamma):
    w = [1.0, 0.0, 2.0, 3.0, 0.0, 1.0, 1.0, 5.0]
    switches = 12000
    counts = collections.Counter(i for k in range(switches) for i in sample_weighted(4, k, 8, gamma, w))
    assert counts[1] == 0 and counts[4] == 0
    p = [x / sum(w) for x in w] if gamma == 1 else _inclusion_gamma2(w)
    for i in range(8):
        expected = switches * p[i]
        sigma = max((switches * p[i] * (1 - p[i])) ** 0.5, 1e-9)
        assert abs(counts[i] - expected) < 5 * sigma, (i, counts[i], expected)


def test_bad_weights_and_modes():
    with pytest.raises(ValueError, match="LisaConfig.sampling must be one of"):
        LisaConfig(sampling="importance")
    with pytest.raises(ValueError, match="needs layer_weights"):
        LisaConfig(sampling="weighted")
    with pytest.raises(ValueError, match=r"layer_weights is only used with sampling=\"weighted\""):
        LisaConfig(sampling="gradient", layer_weights=[1, 1])
    with pytest.raises(ValueError, match=r"layer_weights\[1\] is -1.0"):
        LisaConfig(sampling="weighted", layer_weights=[1, -1.0, 1])
    with pytest.raises(ValueError, match=r"layer_weights\[0\] must be a finite number"):
        LisaConfig(sampling="weighted", layer_weights=[float("nan"), 1, 1])
    with pytest.raises(ValueError, match="1 positive weight.*activated_layers \\(gamma\\) is 2"):
        LisaConfig(sampling="weighted", layer_weights=[0, 3, 0], activated_layers=2)
    with pytest.raises(ValueError, match="has 3 entries but the model has 4 decoder layers"):
        LayerSampler(4, LisaConfig(sampling="weighted", layer_weights=[1, 1, 1]))
    with pytest.raises(ValueError, match="outlier_threshold"):
        LisaConfig(sampling="outlier", outlier_threshold=0)
    with pytest.raises(ValueError, match="exploration"):
        LisaConfig(sampling="gradient", exploration=0.0)
    with pytest.raises(ValueError, match="gradient_beta"):
        LisaConfig(sampling="gradient", gradient_beta=1.0)
    with pytest.raises(ValueError, match="data-dependent"):
        LayerSampler(4, LisaConfig(sampling="gradient")).active_layers(0)
    c = LisaConfig(sampling="weighted", layer_weights=[1, 2, 0])
    assert LisaConfig.from_dict(c.to_dict()) == c and c.to_dict()["layer_weights"] == [1.0, 2.0, 0.0]
