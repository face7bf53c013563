"""LisaConfig: the knobs of LISA, validated once so every backend can trust them."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Iterable, List, Literal, Mapping, Optional, Sequence, Tuple

StatePolicy = Literal["reset", "offload"]
SamplingMode = Literal["uniform", "weighted", "outlier", "gradient"]
STATE_POLICIES: Tuple[str, ...] = typing.get_args(StatePolicy)
SAMPLING_MODES: Tuple[str, ...] = typing.get_args(SamplingMode)
EmbeddingUpdate = Literal["dense", "rows"]
EMBEDDING_UPDATES: Tuple[str, ...] = typing.get_args(EmbeddingUpdate)


@dataclass
class LisaConfig:
    activated_layers: int = 2
    """gamma: how many decoder layers train at a time (LMFlow `lisa_activated_layers`)."""

    interval_steps: int = 20
    """K: optimizer steps between switches (LMFlow `lisa_interval_steps`, SWIFT `lisa_step_interval`)."""

    seed: int = 0
    """Seeds the layer schedule. Every rank and every resumed run with the same seed trains the same layers."""

    train_embeddings: bool = True
    """Always train the input embeddings (a model that ties them to the LM head must freeze both or neither)."""

    train_head: bool = True
    """Always train everything outside the decoder blocks except the input embeddings:
    the LM head and the final norm (plus, for a vision-language model, its vision tower and projector).
    A model that ties the head to the input embeddings must freeze both or neither."""

    embedding_update: EmbeddingUpdate = "dense"
    """How trained input embeddings and LM head are updated: "dense" trains the whole vocab x hidden
    matrices (a dense gradient, fp32 master and two Adam moments of that size); "rows" keeps them frozen
    and trains a delta for the rows of the tokens fed in training, at most `embedding_rows` of them
    (embedding lookup plus delta; head logits plus hidden x delta added in place), so gradient, master
    and moments are embedding_rows x hidden and no dense vocabulary gradient exists. Tokens never fed
    keep their pretrained rows. A tied embedding/head has one delta. Runs on LisaOptimizer, DeepSpeed
    ZeRO-1/2 and FSDP2; see lisa_dist/vocab_rows.py and docs/below-lora.md."""

    embedding_rows: int = 8192
    """embedding_update="rows": how many vocabulary rows can train. Tokens take rows in the order they
    are first fed; once all are taken, new tokens keep their pretrained rows (with a warning)."""

    layers_path: Optional[str] = None
    """Dotted path of the nn.ModuleList of decoder blocks (e.g. "model.layers"); found automatically when None."""

    state_policy: StatePolicy = "reset"
    """What happens to a layer's fp32 master and optimizer moments when it is deactivated:
    "reset" drops them (a re-sampled layer starts from fresh moments and its current weights),
    "offload" moves them to host memory and brings them back when the layer is sampled again."""

    sampling: SamplingMode = "uniform"
    """How the gamma layers of each interval are drawn (without replacement):
    "uniform" (the paper), "weighted" (probabilities proportional to `layer_weights`),
    "outlier" (proportional to each layer's OwLore outlier ratio, computed once before training from
    calibration batches; see lisa_dist/outlier.py) or "gradient" (MISA-style: a moving average of each
    layer's squared gradient norm, p proportional to exp(gradient_eta * G^2 / mean G^2), mixed with
    `exploration`; see lisa_dist/importance.py)."""

    layer_weights: Optional[Tuple[float, ...]] = None
    """sampling="weighted" only: one non-negative weight per decoder layer (normalised internally)."""

    outlier_threshold: float = 13.0
    """sampling="outlier": M, a weight is an outlier when its score |W_ij| * ||X_j||_2 exceeds M times
    its layer's mean score (OwLore's Hyper_m; 13 in its code)."""

    calibration_batches: int = 4
    """sampling="outlier": training batches per rank that lisa-train forwards (no gradient) to measure
    the input-activation column norms ||X_j||_2."""

    gradient_eta: float = 1.0
    """sampling="gradient": temperature eta of p proportional to exp(eta * G^2 / mean(G^2))."""

    gradient_beta: float = 0.9
    """sampling="gradient": moving-average factor, G^2 <- beta * G^2 + (1 - beta) * (interval mean)."""

    exploration: float = 0.1
    """sampling="gradient": share of probability spread uniformly, so no layer's probability falls
    below exploration / num_layers."""

    def __post_init__(self):
        for name in ("activated_layers", "interval_steps", "seed", "calibration_batches", "embedding_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"LisaConfig.{name} must be an integer, got {value!r} ({type(value).__name__})")
        if self.activated_layers <= 0:
            raise ValueError(
                f"LisaConfig.activated_layers (gamma) must be >= 1, got {self.activated_layers}; "
                "use 2 (LMFlow's default) or up to 8 (the paper's best quality setting)")
        if self.interval_steps <= 0:
            raise ValueError(
                f"LisaConfig.interval_steps (K) must be >= 1, got {self.interval_steps}; "
                "use 20 (LMFlow's default) or 5 (the paper's ablation)")
        if self.state_policy not in STATE_POLICIES:
            raise ValueError(
                f"LisaConfig.state_policy must be one of {STATE_POLICIES}, got {self.state_policy!r}")
        if self.embedding_update not in EMBEDDING_UPDATES:
            raise ValueError(f"LisaConfig.embedding_update must be one of {EMBEDDING_UPDATES}, got "
                             f"{self.embedding_update!r}")
        if self.embedding_rows <= 0:
            raise ValueError(f"LisaConfig.embedding_rows must be >= 1, got {self.embedding_rows}; it bounds the "
                             "vocabulary rows embedding_update=\"rows\" trains (a fine-tuning set feeds a few "
                             "thousand distinct tokens)")
        if self.layers_path is not None and (not isinstance(self.layers_path, str) or not self.layers_path.strip()):
            raise ValueError(f"LisaConfig.layers_path must be a dotted path such as 'model.layers' or None, "
                             f"got {self.layers_path!r}")
        self._check_sampling()

    def _check_sampling(self) -> None:
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"LisaConfig.sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if self.layer_weights is not None and self.sampling != "weighted":
            raise ValueError(f"LisaConfig.layer_weights is only used with sampling=\"weighted\" but sampling is "
                             f"{self.sampling!r}; set sampling=\"weighted\" or drop layer_weights")
        if self.sampling == "weighted":
            if self.layer_weights is None:
                raise ValueError("LisaConfig.sampling=\"weighted\" needs layer_weights: one non-negative float per "
                                 "decoder layer (e.g. --layer-weights 1,1,2,4)")
            self.layer_weights = check_weights(self.layer_weights, self.activated_layers, "LisaConfig.layer_weights")
        for name in ("outlier_threshold", "gradient_eta", "gradient_beta", "exploration"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"LisaConfig.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.outlier_threshold <= 0:
            raise ValueError(f"LisaConfig.outlier_threshold (M) must be > 0, got {self.outlier_threshold}; "
                             "OwLore uses 13, lower values count more weights as outliers")
        if self.calibration_batches <= 0:
            raise ValueError(f"LisaConfig.calibration_batches must be >= 1, got {self.calibration_batches}")
        if self.gradient_eta < 0:
            raise ValueError(f"LisaConfig.gradient_eta must be >= 0 (0 is uniform), got {self.gradient_eta}")
        if not 0 <= self.gradient_beta < 1:
            raise ValueError(f"LisaConfig.gradient_beta must be in [0, 1), got {self.gradient_beta}; 0.9 averages "
                             "over about ten intervals per layer")
        if not 0 < self.exploration <= 1:
            raise ValueError(f"LisaConfig.exploration must be in (0, 1] so that every layer keeps a non-zero "
                             f"probability, got {self.exploration}; 0.1 is a common choice")

    def check_num_layers(self, num_layers: int) -> None:
        """gamma can only be checked against a model: raise if it asks for more layers than there are."""
        if self.activated_layers > num_layers:
            raise ValueError(
                f"LisaConfig.activated_layers (gamma) is {self.activated_layers} but the model has only "
                f"{num_layers} decoder layers; choose a value from 1 to {num_layers}")
        if self.layer_weights is not None and len(self.layer_weights) != num_layers:
            raise ValueError(
                f"LisaConfig.layer_weights has {len(self.layer_weights)} entries but the model has {num_layers} "
                f"decoder layers; give exactly one weight per layer")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["layer_weights"] is not None:
            out["layer_weights"] = list(out["layer_weights"])
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "LisaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LisaConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)


def check_weights(weights: Sequence[float], gamma: int, field: str) -> Tuple[float, ...]:
    """Validate a per-layer weight vector (finite, >= 0, at least gamma positive); return it as floats."""
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise ValueError(f"{field} must be a list of numbers, one per decoder layer, got {weights!r}")
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"{field}[{i}] must be a finite number, got {w!r}")
        if w < 0:
            raise ValueError(f"{field}[{i}] is {w}: weights must be >= 0 (0 means never sampled)")
        out.append(float(w))
    positive = sum(1 for w in out if w > 0)
    if positive < gamma:
        raise ValueError(f"{field} has {positive} positive weight(s) but activated_layers (gamma) is {gamma}: "
                         f"each interval draws gamma distinct layers, so give at least {gamma} layers a weight > 0 "
                         "or lower activated_layers")
    return tuple(out)


# --- resuming ----------------------------------------------------------------------------------------

RESUME_FIELDS = ("activated_layers", "interval_steps", "seed", "train_embeddings", "train_head", "state_policy",
                 "sampling", "layer_weights", "gradient_eta", "gradient_beta", "exploration", "embedding_update",
                 "embedding_rows")
"""The LisaConfig fields a resumed run must share with the run that wrote the checkpoint: they decide
which parameters train (the optimizer's layout) or which layers each interval draws (the schedule)."""

NOT_RESUME_FIELDS = {
    "layers_path": "where the blocks are found; the split it leads to is compared as the number of decoder layers",
    "outlier_threshold": "sampling=\"outlier\" measures the ratios once; a checkpoint restores the saved ones",
    "calibration_batches": "sampling=\"outlier\" measures the ratios once; a checkpoint restores the saved ones",
}
"""The other fields, and why a resume may change them. Every field is in one of the two (a unit test
checks it), so a new field needs this decision."""

_GRADIENT_ONLY = ("gradient_eta", "gradient_beta", "exploration")


def resume_record(config: LisaConfig, num_layers: int) -> dict:
    """What a checkpoint stores so that `check_resumable` can compare a later run with it: the
    RESUME_FIELDS of `config` (plain JSON values) and the model's number of decoder layers."""
    out = {name: getattr(config, name) for name in RESUME_FIELDS}
    if out["layer_weights"] is not None:
        out["layer_weights"] = list(out["layer_weights"])
    out["num_layers"] = num_layers
    return out


def _saved_settings(saved: Mapping, config: LisaConfig) -> dict:
    """The record's value of each compared field; a field it lacks was written before the field
    existed, so that run had the default."""
    defaults = {f.name: f.default for f in dataclasses.fields(LisaConfig)}
    out = {name: saved.get(name, defaults.get(name)) for name in (*RESUME_FIELDS, "num_layers")
           if name not in _GRADIENT_ONLY or config.sampling == "gradient"}
    if out["layer_weights"] is not None:
        out["layer_weights"] = [float(w) for w in out["layer_weights"]]
    return out


def resume_differences(saved: Mapping, config: LisaConfig, num_layers: int) -> List[str]:
    """"field: checkpoint X vs now Y" for every RESUME_FIELD and the number of decoder layers where the
    saved record (resume_record's, or a LisaConfig.to_dict() plus "num_layers") differs from this run.
    The gradient-sampling knobs count only when this run samples by gradient."""
    now = resume_record(config, num_layers)
    return [f"{name}: checkpoint {then!r} vs now {now[name]!r}"
            for name, then in _saved_settings(saved, config).items() if then != now[name]]


def check_resumable(saved: Mapping, config: LisaConfig, num_layers: int, source: str,
                    other_differences: Iterable[str] = ()) -> None:
    """Raise ValueError naming every difference between the checkpoint `source` (its record `saved`)
    and this run, LISA's (resume_differences) and those the caller found (`other_differences`, e.g.
    the ZeRO stage): resuming across any of them would train other parameters or other layers."""
    diffs = resume_differences(saved, config, num_layers) + list(other_differences)
    if not diffs:
        return
    then, now = _saved_settings(saved, config), resume_record(config, num_layers)
    changed = [f"{name}={then[name]!r}" for name in then if name != "num_layers" and then[name] != now[name]]
    fix = "Resume with the settings the checkpoint was saved with"
    if changed:
        fix += f" (LisaConfig {', '.join(changed)}; in lisa-train the flags of the same names)"
    raise ValueError(f"cannot resume from {source}: {'; '.join(diffs)}. {fix}, or start a new run")
