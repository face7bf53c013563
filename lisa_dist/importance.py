"""LayerImportance: the probability vector behind each switch, and the state it is computed from.

- "uniform": no vector (the original schedule, unchanged).
- "weighted": the config's `layer_weights`.
- "outlier": OwLore outlier ratios D_l, measured once before training (lisa_dist/outlier.py) and
  handed to `set_outlier_ratios`.
- "gradient" (MISA-style): every optimizer step reports the squared gradient norm of each trained
  layer (already reduced across ranks); an interval's mean folds into a per-layer moving average
  G2_l <- beta * G2_l + (1 - beta) * mean when the interval ends (the first observation seeds it).
  Until every layer has been trained once, the draw takes unvisited layers first (uniformly among
  them, or all of them plus weighted draws among the visited when fewer than gamma are left).
  Then p_l = (1 - exploration) * q_l + exploration / N with q_l proportional to
  exp(eta * G2_l / mean(G2)); normalising by the mean makes eta independent of the loss scale.

Every rank computes the vector from the same all-reduced numbers with the same sequence of IEEE
double operations (+, -, *, /, floor, ldexp; the exponential is a fixed Taylor polynomial, not libm),
so the vector is bit-identical on every rank and platform; the agreement check still compares it.
The whole state is plain floats and lists (`state_dict`), saved in every checkpoint.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from lisa_dist.config import LisaConfig, check_weights
from lisa_dist.sampling import LayerSampler

_LN2 = 0.6931471805599453


def det_exp(x: float) -> float:
    """exp(x) for x <= 0 from basic IEEE operations only, so identical on every platform (libm's exp
    is not correctly rounded and differs between implementations): x = k ln2 + r with |r| <= ln2/2,
    a degree-18 Taylor polynomial in r (truncation error < 1e-25), then an exact scaling by 2**k."""
    assert x <= 0.0, x
    if x < -745.0:
        return 0.0
    k = math.floor(x / _LN2 + 0.5)
    r = x - k * _LN2
    term, total = 1.0, 1.0
    for n in range(1, 19):
        term = term * r / n
        total = total + term
    return math.ldexp(total, k)


class LayerImportance:
    def __init__(self, num_layers: int, config: LisaConfig):
        self.num_layers = num_layers
        self.config = config
        self.mode = config.sampling
        self.outlier_ratios: Optional[Tuple[float, ...]] = None
        # gradient: moving average of squared gradient norms (None until the layer has trained)
        self.ema: List[Optional[float]] = [None] * num_layers
        # gradient: sums of the current interval's per-step squared norms, and the step count
        self.pending: Dict[int, float] = {}
        self.pending_steps = 0
        self.probabilities: Optional[Tuple[float, ...]] = None
        """The vector the current interval was drawn with (None under uniform sampling)."""

    @property
    def needs_gradients(self) -> bool:
        return self.mode == "gradient"

    def set_outlier_ratios(self, ratios: Sequence[float]) -> None:
        if len(ratios) != self.num_layers:
            raise ValueError(f"{len(ratios)} outlier ratios for {self.num_layers} decoder layers")
        try:
            self.outlier_ratios = check_weights(ratios, self.config.activated_layers, "outlier ratios")
        except ValueError as e:
            raise ValueError(f"{e}; with M={self.config.outlier_threshold:g} too few layers have outlier weights "
                             "(common in small or randomly initialised models): lower "
                             "LisaConfig.outlier_threshold or use another sampling mode") from None

    # --- gradient statistics ---------------------------------------------------------------------

    def observe(self, layers: Sequence[int], squared_norms: Sequence[float]) -> None:
        """One optimizer step: the squared gradient norm of each trained layer, summed over ranks."""
        for i, g2 in zip(layers, squared_norms):
            self.pending[int(i)] = self.pending.get(int(i), 0.0) + float(g2)
        self.pending_steps += 1

    def close_interval(self) -> None:
        if not self.pending_steps:
            return
        beta = self.config.gradient_beta
        for i in sorted(self.pending):
            mean = self.pending[i] / self.pending_steps
            self.ema[i] = mean if self.ema[i] is None else beta * self.ema[i] + (1.0 - beta) * mean
        self.pending, self.pending_steps = {}, 0

    def _gradient_weights(self) -> Tuple[List[float], Tuple[int, ...]]:
        gamma, n = self.config.activated_layers, self.num_layers
        unvisited = tuple(i for i in range(n) if self.ema[i] is None)
        if len(unvisited) >= gamma:
            return [1.0 if self.ema[i] is None else 0.0 for i in range(n)], ()
        seen = [e for e in self.ema if e is not None]
        mean = sum(seen) / len(seen)
        scores = [0.0 if e is None or mean == 0.0 else e / mean for e in self.ema]
        top = max(scores)
        eta, eps = self.config.gradient_eta, self.config.exploration
        q = [0.0 if self.ema[i] is None else det_exp(eta * (scores[i] - top)) for i in range(n)]
        total = sum(q)
        return [(1.0 - eps) * x / total + eps / n for x in q], unvisited

    # --- the draw ---------------------------------------------------------------------------------

    def draw(self, sampler: LayerSampler, k: int) -> Tuple[int, ...]:
        """Close the interval that just ended and draw the active set of interval k."""
        forced: Tuple[int, ...] = ()
        if self.mode == "uniform":
            self.probabilities = None
            return sampler.active_layers(k)
        if self.mode == "weighted":
            weights = list(self.config.layer_weights)
        elif self.mode == "outlier":
            if self.outlier_ratios is None:
                raise ValueError("sampling=\"outlier\" needs the outlier ratios before the first switch: pass "
                                 "calibration batches (lisa_dist.outlier.outlier_ratios)")
            weights = list(self.outlier_ratios)
        else:
            self.close_interval()
            weights, forced = self._gradient_weights()
        total = sum(weights)
        self.probabilities = tuple(w / total for w in weights)
        return sampler.active_layers(k, weights, forced)

    # --- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"mode": self.mode, "outlier_ratios": None if self.outlier_ratios is None else list(self.outlier_ratios),
                "ema": list(self.ema), "pending": {str(i): v for i, v in sorted(self.pending.items())},
                "pending_steps": self.pending_steps,
                "probabilities": None if self.probabilities is None else list(self.probabilities)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode", "uniform") != self.mode:
            raise ValueError(f"the checkpoint was written with sampling={state.get('mode')!r}, this run uses "
                             f"{self.mode!r}; resume with the same LisaConfig.sampling")
        ratios = state.get("outlier_ratios")
        self.outlier_ratios = None if ratios is None else tuple(float(r) for r in ratios)
        self.ema = [None if e is None else float(e) for e in state.get("ema", [None] * self.num_layers)]
        self.pending = {int(i): float(v) for i, v in state.get("pending", {}).items()}
        self.pending_steps = int(state.get("pending_steps", 0))
        probs = state.get("probabilities")
        self.probabilities = None if probs is None else tuple(float(p) for p in probs)
