"""Where the decoder blocks are, and which parameters LISA trains always, per layer, or never.

Discovery is structural (no table of model classes), so any architecture whose blocks live in an
``nn.ModuleList`` works without code changes; anything else is one ``layers_path`` away.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from lisa_dist import vocab_rows
from lisa_dist.config import LisaConfig
from lisa_dist.embeddings import input_embeddings

__all__ = ["DecoderLayers", "ParamSplit", "find_decoder_layers", "split_parameters", "tied_freeze_problem"]

NamedParams = list[tuple[str, nn.Parameter]]


@dataclass
class DecoderLayers:
    path: str
    """Dotted path of the ModuleList inside the model, e.g. "model.layers"."""

    layers: nn.ModuleList
    """The decoder blocks, in forward order."""


@dataclass
class ParamSplit:
    layers_path: str
    """Dotted path of the decoder-block ModuleList the split was made against."""

    always: NamedParams
    """Outside the decoder blocks and trained every step (embeddings and/or head side, per the config)."""

    frozen_outside: NamedParams
    """Outside the decoder blocks but never trained (train_embeddings=False / train_head=False)."""

    per_layer: list[NamedParams]
    """per_layer[i]: (full name, param) of decoder block i, in model.named_parameters() order."""

    @property
    def num_layers(self) -> int:
        return len(self.per_layer)

    @property
    def always_params(self) -> list[nn.Parameter]:
        return [p for _, p in self.always]

    def layer_params(self, indices: Iterable[int]) -> list[nn.Parameter]:
        """Parameters of the given blocks, in model order whatever the order of ``indices``
        (so optimizer groups built from a set are the same on every rank)."""
        indices = sorted(set(indices))
        bad = [i for i in indices if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"layer indices {bad} are out of range: the model has {self.num_layers} "
                             f"decoder layers at {self.layers_path!r}, valid indices are 0..{self.num_layers - 1}")
        return [p for i in indices for _, p in self.per_layer[i]]


def _numel(p: torch.Tensor) -> int:
    # ZeRO-3 partitions parameters in place (numel() == 0); ds_numel keeps the full size.
    return getattr(p, "ds_numel", None) or p.numel()


def _describe(path: str, layers: nn.ModuleList) -> str:
    counts = Counter(type(m).__name__ for m in layers)
    classes = " + ".join(f"{n} x {name}" for name, n in counts.items())
    numel = sum(_numel(p) for p in layers.parameters())
    return f"{path or '<root>'} ({classes}, {numel:,} params)"


def _hint(example: str) -> str:
    return (f'pass the dotted path of the decoder-block nn.ModuleList: LisaConfig(layers_path="{example}") '
            f"or --layers-path {example} on the CLI")


def _module_paths(model: nn.Module, target: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules(remove_duplicate=False) if m is target]


def _related(a: str, b: str) -> bool:
    """True when one dotted path is the other or lies inside it ("" is the root, which holds everything)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".") or a == "" or b == ""


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split(".") if a else [], b.split(".") if b else []):
        if x != y:
            break
        n += 1
    return n


def _candidates(model: nn.Module, embed_paths: list[str]) -> list[tuple[str, nn.ModuleList]]:
    """Outermost ModuleLists of parameter-holding blocks.

    Blocks may be of different classes (hybrid attention/SSM stacks). Lists nested in a candidate
    (MoE experts, per-block sub-lists) are skipped, and so is anything containing or inside the input
    embeddings (a list of per-codebook embeddings is not a decoder stack).
    """
    found: list[tuple[str, nn.ModuleList]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(p + ".") for p, _ in found):
            continue
        if any(_related(path, e) for e in embed_paths):
            continue
        if all(any(True for _ in child.parameters()) for child in module):
            found.append((path, module))
    return found


def find_decoder_layers(model: nn.Module, layers_path: Optional[str] = None) -> DecoderLayers:
    """Locate the ModuleList of decoder blocks.

    ``layers_path`` wins when given. Otherwise, among the candidate lists, prefer the one whose path
    shares the longest prefix with the input embeddings' parent module (a vision-language model's
    language layers sit beside its token embeddings, the vision tower does not), then the one with
    the most parameters; a remaining tie, or no candidate, is an error naming the candidates.
    """
    embed = input_embeddings(model)
    embed_paths = _module_paths(model, embed) if embed is not None else []
    candidates = _candidates(model, embed_paths)
    listing = "\n".join(f"  {_describe(p, m)}" for p, m in candidates) or "  (none)"

    if layers_path is not None:
        return _resolve(model, layers_path, listing)

    if not candidates:
        raise ValueError(f"found no nn.ModuleList of parameter-holding blocks in {type(model).__name__}, "
                         f"so its decoder layers cannot be located automatically; {_hint('model.layers')}")

    # Compare with the embeddings' parent: that is the module the decoder stack normally sits in.
    anchor = embed_paths[0].rpartition(".")[0] if embed_paths else ""

    def rank(c: tuple[str, nn.ModuleList]) -> tuple[int, int]:
        return _common_prefix(c[0], anchor), sum(_numel(p) for p in c[1].parameters())

    ranked = sorted(candidates, key=rank, reverse=True)
    if len(ranked) > 1 and rank(ranked[0]) == rank(ranked[1]):
        tied = [c for c in ranked if rank(c) == rank(ranked[0])]
        raise ValueError(f"cannot tell which of {len(tied)} equally plausible ModuleLists in "
                         f"{type(model).__name__} holds the decoder layers; candidates:\n{listing}\n"
                         f"{_hint(tied[0][0])}")
    path, layers = ranked[0]
    return DecoderLayers(path=path, layers=layers)


def _resolve(model: nn.Module, layers_path: str, listing: str) -> DecoderLayers:
    module: nn.Module = model
    walked: list[str] = []
    for part in layers_path.split("."):
        child = module._modules.get(part)
        if child is None:
            here = ".".join(walked) or "<root>"
            children = ", ".join(module._modules) or "(none)"
            raise ValueError(f"layers_path {layers_path!r} does not exist: {here} "
                             f"({type(module).__name__}) has no submodule {part!r}; its submodules are: "
                             f"{children}. Detected candidates:\n{listing}")
        module, walked = child, walked + [part]
    if not isinstance(module, nn.ModuleList):
        raise ValueError(f"layers_path {layers_path!r} is a {type(module).__name__}, not an nn.ModuleList of "
                         f"decoder blocks. Detected candidates:\n{listing}")
    if len(module) == 0:
        raise ValueError(f"layers_path {layers_path!r} is an empty ModuleList: LISA needs at least one "
                         f"decoder layer to sample. Detected candidates:\n{listing}")
    return DecoderLayers(path=layers_path, layers=module)


def _sides(model: nn.Module, block_prefix: str) -> tuple[set[int], set[int], tuple[str, ...]]:
    """(ids of embedding-side parameters, ids of head-side parameters, the embeddings' name prefixes):
    outside the decoder blocks, a parameter under the input embeddings is embedding-side and anything
    else head-side. A tied tensor is listed once by named_parameters(); its aliases put it on both."""
    embed = input_embeddings(model)
    embed_prefixes = tuple(p + "." for p in _module_paths(model, embed)) if embed is not None else ()
    is_embed: set[int] = set()
    is_head: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith(block_prefix):  # inside a decoder block ("" when the model is the block list)
            continue
        (is_embed if name.startswith(embed_prefixes) else is_head).add(id(p))
    return is_embed, is_head, embed_prefixes


def tied_freeze_problem(model: nn.Module, config: LisaConfig) -> Optional[str]:
    """Why freezing one side of a tied embedding does not freeze it, or None.

    With tied weights the input embeddings and the LM head are one tensor, and a tied tensor trains
    if either train_embeddings or train_head is set: freezing one side alone leaves it trainable
    (for SmolLM2 or Gemma 3 that is most of LISA's always-active set). split_parameters warns with
    this text; lisa-train refuses to start with it."""
    if config.train_embeddings == config.train_head:
        return None
    found = find_decoder_layers(model, config.layers_path)
    is_embed, is_head, _ = _sides(model, f"{found.path}." if found.path else "")
    tied = [name for name, p in model.named_parameters() if id(p) in is_embed and id(p) in is_head]
    if not tied:
        return None
    frozen, flag = (("train_embeddings", "--no-train-embeddings") if not config.train_embeddings
                    else ("train_head", "--no-train-head"))
    return (f"{type(model).__name__} ties its input embeddings and its LM head ({', '.join(tied)} is both), so "
            f"{frozen}=False alone ({flag}) still trains that tensor through the other side; to freeze it set "
            "train_embeddings=False and train_head=False (lisa-train: --no-train-embeddings and --no-train-head), "
            "to train it set neither")


def split_parameters(model: nn.Module, config: LisaConfig) -> ParamSplit:
    """Partition every parameter (tied ones once) into always-trained, never-trained and per-layer.

    Uses ``config.layers_path``, ``config.train_embeddings`` and ``config.train_head``.
    Outside the blocks, the input embeddings follow ``train_embeddings`` and everything else (LM head,
    final norm, a VLM's vision tower and projector, positional tables) follows ``train_head``; a tensor
    tied between the two trains if either flag is set (a warning says so when only one is).

    Under ``config.embedding_update="rows"`` this first attaches the row deltas to the model
    (lisa_dist.vocab_rows.attach, once): the deltas are always active, the vocabulary weights they
    stand for frozen.
    """
    rows = vocab_rows.attach(model, config)
    replaced = {id(p) for p in vocab_rows.trained_weights(model).values()}
    row_params = {id(p) for p in rows.parameters()} if rows is not None else set()
    found = find_decoder_layers(model, config.layers_path)
    block_prefix = f"{found.path}." if found.path else ""

    def layer_of(name: str) -> Optional[int]:
        if not name.startswith(block_prefix):
            return None
        return int(name[len(block_prefix):].split(".", 1)[0])

    is_embed, is_head, embed_prefixes = _sides(model, block_prefix)
    if not embed_prefixes and not config.train_embeddings:
        raise ValueError(f"train_embeddings=False but {type(model).__name__} has no get_input_embeddings(), "
                         "so there is nothing to freeze; set train_embeddings=True or freeze the "
                         "embedding parameters yourself")
    problem = tied_freeze_problem(model, config)
    if problem:
        warnings.warn(problem, stacklevel=2)

    always: NamedParams = []
    frozen_outside: NamedParams = []
    per_layer: list[NamedParams] = [[] for _ in found.layers]
    for name, p in model.named_parameters():
        i = layer_of(name)
        if i is not None:
            per_layer[i].append((name, p))
        elif id(p) in row_params:
            always.append((name, p))
        elif id(p) in replaced:
            frozen_outside.append((name, p))
        elif (id(p) in is_embed and config.train_embeddings) or (id(p) in is_head and config.train_head):
            always.append((name, p))
        else:
            frozen_outside.append((name, p))
    return ParamSplit(layers_path=found.path, always=always, frozen_outside=frozen_outside, per_layer=per_layer)
