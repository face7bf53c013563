"""Files every backend writes or reads: atomic text writes and weights-only torch loads.

Core, so the backends' checkpoints and the recipe's share one implementation without a backend
importing the recipe.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def weights_only_loads(extra_globals: Iterable = ()):
    """Every torch.load inside runs with weights_only=True, including third-party ones that ask for
    weights_only=False (DeepSpeed's): a checkpoint from elsewhere cannot run code when it is loaded.
    `extra_globals` are plain-data classes such files pickle, allowed by name."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def load_tensors(path: Path):
    """torch.load of a file this package wrote (tensors, numbers, strings, lists, dicts only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
