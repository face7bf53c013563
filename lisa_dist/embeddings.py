"""The input and output embedding modules of a model, as transformers' accessors give them."""
from __future__ import annotations

from typing import Optional

from torch import nn


def _accessor(model: nn.Module, name: str) -> Optional[nn.Module]:
    get = getattr(model, name, None)
    if get is None:
        return None
    try:
        return get()
    except NotImplementedError:  # transformers' base class raises this when it cannot guess
        return None


def input_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """`model.get_input_embeddings()`, or None where the model has no such accessor or it cannot tell."""
    return _accessor(model, "get_input_embeddings")


def output_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """`model.get_output_embeddings()` (the LM head), or None as for input_embeddings."""
    return _accessor(model, "get_output_embeddings")
