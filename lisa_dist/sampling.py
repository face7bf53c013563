"""The layer schedule: the active set is a pure function of (seed, switch index, num_layers, gamma).

No RNG library is involved: torch, numpy and Python's `random` have all changed their streams
between releases, and a schedule that moves with a library upgrade breaks resume and makes ranks
on mixed images disagree. SHA-256 in counter mode is the same everywhere, forever.
"""
from __future__ import annotations

import hashlib
from typing import Tuple

from .config import LisaConfig


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


class LayerSampler:
    """Which decoder layers train during switch interval k (steps k*K .. (k+1)*K - 1)."""

    def __init__(self, num_layers: int, config: LisaConfig):
        config.check_num_layers(num_layers)
        self.num_layers = num_layers
        self.config = config

    def active_layers(self, k: int) -> Tuple[int, ...]:
        return sample_layers(self.config.seed, k, self.num_layers, self.config.activated_layers)

    def switch_index(self, step: int) -> int:
        """The switch interval that optimizer step `step` (0-based) belongs to."""
        return step // self.config.interval_steps

    def schedule(self, num_switches: int):
        return [self.active_layers(k) for k in range(num_switches)]
