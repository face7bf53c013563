import collections

import pytest

from lisa_dist import LayerSampler, LisaConfig, sample_layers

pytestmark = pytest.mark.unit

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
