"""LisaConfig: the knobs of LISA, validated once so every backend can trust them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

STATE_POLICIES = ("reset", "offload")


@dataclass
class LisaConfig:
    activated_layers: int = 2
    """gamma: how many decoder layers train at a time (LMFlow `lisa_activated_layers`)."""

    interval_steps: int = 20
    """K: optimizer steps between switches (LMFlow `lisa_interval_steps`, SWIFT `lisa_step_interval`)."""

    seed: int = 0
    """Seeds the layer schedule. Every rank and every resumed run with the same seed trains the same layers."""

    train_embeddings: bool = True
    """Always train the input embeddings."""

    train_head: bool = True
    """Always train everything outside the decoder blocks except the input embeddings:
    the LM head and the final norm (plus, for a vision-language model, its vision tower and projector)."""

    layers_path: Optional[str] = None
    """Dotted path of the nn.ModuleList of decoder blocks (e.g. "model.layers"); found automatically when None."""

    state_policy: str = "reset"
    """What happens to a layer's fp32 master and optimizer moments when it is deactivated:
    "reset" drops them (a re-sampled layer starts from fresh moments and its current weights),
    "offload" moves them to host memory and brings them back when the layer is sampled again."""

    def __post_init__(self):
        for name in ("activated_layers", "interval_steps", "seed"):
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
        if self.layers_path is not None and (not isinstance(self.layers_path, str) or not self.layers_path.strip()):
            raise ValueError(f"LisaConfig.layers_path must be a dotted path such as 'model.layers' or None, "
                             f"got {self.layers_path!r}")

    def check_num_layers(self, num_layers: int) -> None:
        """gamma can only be checked against a model: raise if it asks for more layers than there are."""
        if self.activated_layers > num_layers:
            raise ValueError(
                f"LisaConfig.activated_layers (gamma) is {self.activated_layers} but the model has only "
                f"{num_layers} decoder layers; choose a value from 1 to {num_layers}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LisaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LisaConfig field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)
