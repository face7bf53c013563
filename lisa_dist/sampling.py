"""The layer schedule: the active set is a pure function of (seed, switch index, num_layers, gamma),
plus the probability vector under weighted sampling.

No RNG library is involved: torch, numpy and Python's `random` have all changed their streams
between releases, and a schedule that moves with a library upgrade breaks resume and makes ranks
on mixed images disagree. SHA-256 in counter mode is the same everywhere, forever. Weighted draws
use the same stream and integer arithmetic only (each float weight is an exact binary fraction),
so no floating-point rounding, libm or platform can move a draw.
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Tuple

from lisa_dist.config import LisaConfig, check_weights


def _uniform_below(key: bytes, counter: int, bound: int) -> Tuple[int, int]:
    """An unbiased integer in [0, bound) from the hash stream, by rejection; returns (value, next counter)."""
    limit = (1 << 64) - ((1 << 64) % bound)
    while True:
        word = int.from_bytes(hashlib.sha256(key + counter.to_bytes(8, "little")).digest()[:8], "little")
        counter += 1
        if word < limit:
            return word % bound, counter


def sample_layers(seed: int, switch_index: int, num_layers: int, gamma: int) -> Tuple[int, ...]:
    """gamma distinct layer indices, uniform over all subsets, sorted."""
    if not 0 < gamma <= num_layers:
        raise ValueError(f"gamma must be in 1..{num_layers}, got {gamma}")
    if switch_index < 0:
        raise ValueError(f"switch index must be >= 0, got {switch_index}")
    key = f"lisa_dist/v1/{seed}/{switch_index}/{num_layers}/{gamma}".encode()
    pool = list(range(num_layers))
    counter = 0
    # Partial Fisher-Yates: the first gamma slots are a uniform random gamma-subset.
    for i in range(gamma):
        j, counter = _uniform_below(key, counter, num_layers - i)
        pool[i], pool[i + j] = pool[i + j], pool[i]
    return tuple(sorted(pool[:gamma]))


def _word(key: bytes, counter: int) -> int:
    return int.from_bytes(hashlib.sha256(key + counter.to_bytes(8, "little")).digest()[:8], "little")


def _as_integers(weights: Sequence[float]) -> list:
    """The weights scaled by one power of two to integers, exactly (a float is m * 2**e)."""
    ratios = [float(w).as_integer_ratio() for w in weights]
    denominator = max(d for _, d in ratios)  # every denominator is a power of two
    return [n * (denominator // d) for n, d in ratios]


def sample_weighted(seed: int, switch_index: int, num_layers: int, gamma: int, weights: Sequence[float],
                    forced: Sequence[int] = ()) -> Tuple[int, ...]:
    """gamma distinct layer indices, sorted: the `forced` ones, then draws without replacement with
    probability proportional to `weights` among the rest (successive sampling, as numpy's
    `choice(replace=False, p=...)`). A zero weight is never drawn.

    Each draw takes a 64-bit word u of the SHA-256 stream and picks the first remaining layer i
    with u * W < 2**64 * (w_0 + ... + w_i), W the remaining total, in exact integer arithmetic.
    """
    if not 0 < gamma <= num_layers:
        raise ValueError(f"gamma must be in 1..{num_layers}, got {gamma}")
    if switch_index < 0:
        raise ValueError(f"switch index must be >= 0, got {switch_index}")
    if len(weights) != num_layers:
        raise ValueError(f"weights has {len(weights)} entries for {num_layers} decoder layers; give one per layer")
    chosen = sorted(set(int(i) for i in forced))
    if len(chosen) > gamma or any(not 0 <= i < num_layers for i in chosen):
        raise ValueError(f"forced layers {list(forced)} must be at most gamma={gamma} indices in 0..{num_layers - 1}")
    need = gamma - len(chosen)
    check_weights([0.0 if i in chosen else w for i, w in enumerate(weights)], need, "weights")
    scaled = _as_integers(weights)
    remaining = [i for i in range(num_layers) if i not in chosen and scaled[i] > 0]
    key = f"lisa_dist/weighted-v1/{seed}/{switch_index}/{num_layers}/{gamma}".encode()
    for counter in range(need):
        target = _word(key, counter) * sum(scaled[i] for i in remaining)
        cumulative = 0
        for pos, i in enumerate(remaining):
            cumulative += scaled[i]
            if target < cumulative << 64:
                chosen.append(remaining.pop(pos))
                break
    return tuple(sorted(chosen))


class LayerSampler:
    """Which decoder layers train during switch interval k (steps k*K .. (k+1)*K - 1)."""

    def __init__(self, num_layers: int, config: LisaConfig):
        config.check_num_layers(num_layers)
        self.num_layers = num_layers
        self.config = config

    def active_layers(self, k: int, weights: Optional[Sequence[float]] = None,
                      forced: Sequence[int] = ()) -> Tuple[int, ...]:
        """The active set of interval k. Uniform unless `weights` (one per layer) are given or the
        config says sampling="weighted" (its layer_weights); "outlier" and "gradient" weights come
        from data, so those modes need them passed (lisa_dist.importance.LayerImportance does)."""
        gamma = self.config.activated_layers
        if weights is None and not forced:
            if self.config.sampling == "uniform":
                return sample_layers(self.config.seed, k, self.num_layers, gamma)
            if self.config.sampling != "weighted":
                raise ValueError(f"sampling={self.config.sampling!r} draws from data-dependent probabilities; "
                                 "pass weights= (see lisa_dist.importance.LayerImportance)")
            weights = self.config.layer_weights
        if weights is None:
            weights = [1.0] * self.num_layers
        return sample_weighted(self.config.seed, k, self.num_layers, gamma, weights, forced)

    def switch_index(self, step: int) -> int:
        """The switch interval that optimizer step `step` (0-based) belongs to."""
        return step // self.config.interval_steps

    def schedule(self, num_switches: int):
        return [self.active_layers(k) for k in range(num_switches)]
