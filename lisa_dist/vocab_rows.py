"""Row-sparse training of the input embeddings and the LM head (LisaConfig.embedding_update="rows").

A fine-tuning set feeds a few thousand distinct tokens of a 128K-262K vocabulary (the GSM split of
benchmarks/real_assets.py: about 1,700 of Gemma 3's 262,144). Under "rows" the vocabulary matrices
stay frozen and a small trainable delta holds the update of the rows of tokens seen in training,
applied by forward hooks:

- input embeddings: ``out = embed(ids) + scale * D[slot(ids)]`` (scale: the module's ``embed_scale``,
  1 for a plain nn.Embedding; checked against the module's own output on the first training forward);
- LM head: ``logits.index_add_(-1, rows, hidden @ D_head.T)``, in place on the head's output.

So no dense V x h gradient ever exists (a tied head's would appear at the start of backward, when
every activation is still alive), and gradient, fp32 master and Adam moments are ``capacity x h``.
The delta of a tied embedding/head is one tensor, as the weight is. Unseen tokens keep their
pretrained rows: their head rows get no "push down" from the softmax either.

The deltas live in a submodule of the model (``lisa_vocab_rows``), so every engine treats them as
ordinary always-active parameters (ZeRO-1/2 partitions, reduces and clips them; FSDP2 puts them in
the root unit). ZeRO-3 is refused (`unsupported`): it partitions parameters in place and gathers
them per module, and these hooks run inside the embedding and head modules' calls.

A slot is taken by a token the first time it is fed in a training forward (grad enabled and the
deltas trainable; train/eval mode is not looked at, as HF models leave from_pretrained in eval
mode); on several ranks each training forward gathers the new token ids of every rank first, so all
ranks assign the same slots in the same order. Under gradient accumulation a token's head row thus
gets gradient from the first micro-batch that feeds it on any rank onwards. ``rows`` (token id per
slot, -1 free) is a persistent buffer, so model checkpoints carry the assignment and resume exactly.
AdamW's weight decay pulls the delta toward zero, i.e. the rows toward their pretrained values.

``merged_state_dict`` folds the deltas into the weights for export; a model saved without it would
drop what the rows learned.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lisa_dist.config import LisaConfig
from lisa_dist.embeddings import input_embeddings, output_embeddings

MODULE_NAME = "lisa_vocab_rows"
"""Attribute of the model that holds the VocabRows module (and prefix of its state-dict keys)."""

ENGINES = ("LisaOptimizer (one process), lisa_dist.deepspeed.initialize with ZeRO stage 1 or 2, FSDPRunner "
           "(FSDP2), and lisa-train --backend single, --backend deepspeed with a ZeRO-1/2 config, --backend fsdp2")
"""Where embedding_update="rows" runs."""


def unsupported(where: str, why: str) -> ValueError:
    """The error for embedding_update="rows" on an engine it does not run on."""
    return ValueError(f"embedding_update=\"rows\" does not run on {where}: {why}. It runs on {ENGINES}. "
                      "Use one of those, or embedding_update=\"dense\" (lisa-train: --embedding-update dense) here")


def _embedding_scale(module: nn.Module) -> Optional[torch.Tensor]:
    """The factor a scaled-embedding module (Gemma's `embed_scale`) multiplies the looked-up rows by."""
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        return None
    return scale if torch.is_tensor(scale) else torch.tensor(float(scale))


class VocabRows(nn.Module):
    """Trainable deltas for up to `capacity` vocabulary rows of the input embeddings and/or LM head.

    `embed` (capacity x h) is the delta of the input-embedding weight, `head` that of an untied LM
    head; a tied weight has one delta, `embed`, used by both hooks. `rows[s]` is the token id of slot
    s (-1: free); slots fill in order, so the used ones are a prefix.
    """

    def __init__(self, capacity: int, vocab_size: int, hidden: int, *, embed: bool, head: bool, tied: bool,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.capacity = capacity
        self.vocab_size = vocab_size
        self.tied = tied
        self.register_buffer("rows", torch.full((capacity,), -1, dtype=torch.long, device=device))
        self.embed = nn.Parameter(torch.zeros(capacity, hidden, dtype=dtype, device=device)) \
            if embed or (tied and head) else None
        self.head = nn.Parameter(torch.zeros(capacity, hidden, dtype=dtype, device=device)) \
            if head and not tied else None
        self._checked_scale = False
        self._warned_full = False

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, vocab_size={self.vocab_size}, tied={self.tied}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """No slot taken, zero deltas: the state a model starts training from (a loader that filled
        a materialized model from a pretrained checkpoint calls this, the checkpoint has no deltas)."""
        self.rows.fill_(-1)
        for p in (self.embed, self.head):
            if p is not None:
                p.zero_()

    @property
    def head_delta(self) -> Optional[nn.Parameter]:
        return self.embed if self.tied else self.head

    # --- slots ---------------------------------------------------------------------------------

    def used(self) -> int:
        return int((self.rows >= 0).sum())

    def slots(self, ids: torch.Tensor) -> torch.Tensor:
        """Slot of each token id, -1 where the token has none. No vocabulary-sized map is kept: the
        (sorted) slot table is searched, so a loaded or restored `rows` buffer is always in effect."""
        sorted_rows, order = torch.sort(self.rows)
        pos = torch.searchsorted(sorted_rows, ids).clamp(max=self.capacity - 1)
        hit = sorted_rows[pos] == ids
        return torch.where(hit, order[pos], torch.full_like(ids, -1))

    @torch.no_grad()
    def track(self, ids: torch.Tensor) -> None:
        """Give slots to the tokens of `ids` (and, on several ranks, of every rank's ids) that have
        none yet, lowest id first, while free slots last."""
        new = torch.unique(ids[self.slots(ids) < 0])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            new = _union_across_ranks(new)
        if new.numel() == 0:
            return
        start = self.used()
        free = self.capacity - start
        if new.numel() > free:
            if not self._warned_full:
                warnings.warn(f"embedding_rows={self.capacity} slots are all taken: {new.numel() - free} new token(s) "
                              "in this batch (and any later ones) keep their pretrained embedding and head rows; "
                              "raise LisaConfig.embedding_rows (--embedding-rows) to train them", stacklevel=2)
                self._warned_full = True
            new = new[:free]
        self.rows[start:start + new.numel()] = new.to(self.rows.device)

    # --- the two hooks' computations ---------------------------------------------------------

    def forward(self, ids: Optional[torch.Tensor] = None, hidden: Optional[torch.Tensor] = None,
                logits: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                padding_idx: Optional[int] = None) -> torch.Tensor:
        """`ids` (and the embedding module's `scale` and `padding_idx`): the embedding delta of each
        token (zeros for tokens without a slot, and for the padding token, whose embedding row
        nn.Embedding never trains; its head row does).
        `hidden` and `logits`: logits with the head delta of the used rows added in place.
        A module call, so engines that gather parameters per module (ZeRO-3) gather the deltas."""
        if ids is not None:
            slot = self.slots(ids)
            hit = slot >= 0 if padding_idx is None else (slot >= 0) & (ids != padding_idx)
            delta = F.embedding(slot.clamp(min=0), self.embed) * hit.unsqueeze(-1).to(self.embed.dtype)
            return delta if scale is None else delta * scale.to(device=delta.device, dtype=delta.dtype)
        n = self.used()
        if n == 0:
            return logits
        delta = self.head_delta[:n]
        return logits.index_add_(-1, self.rows[:n], F.linear(hidden.to(delta.dtype), delta).to(logits.dtype))

    def check_scale(self, module: nn.Module, ids: torch.Tensor, output: torch.Tensor) -> None:
        """Once: the embedding module's output for a token must be scale * its weight row, or the
        delta would enter with another factor than the weight does."""
        if self._checked_scale:
            return
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or weight.shape[0] != self.vocab_size:
            return  # partitioned (ZeRO-3 between gathers): nothing to compare with
        token = ids.reshape(-1)[0]
        scale = _embedding_scale(module)
        expected = weight[token] * (1.0 if scale is None else scale.to(weight.device, weight.dtype))
        got = output.reshape(-1, output.shape[-1])[0]
        if not torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-3):
            raise ValueError(f"embedding_update=\"rows\": {type(module).__name__} (the input embeddings) returns "
                             "something other than (scale x) its weight row for a token, so a row delta cannot be "
                             "added to its output; use embedding_update=\"dense\" for this model")
        self._checked_scale = True


def _union_across_ranks(ids: torch.Tensor) -> torch.Tensor:
    """Sorted distinct ids over every rank's `ids` (each rank may have a different number)."""
    world = dist.get_world_size()
    count = torch.tensor([ids.numel()], dtype=torch.long, device=ids.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    if longest == 0:
        return ids
    padded = torch.full((longest,), -1, dtype=torch.long, device=ids.device)
    padded[:ids.numel()] = ids
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    everyone = torch.cat(gathered)
    return torch.unique(everyone[everyone >= 0])


def find(model: nn.Module) -> Optional[VocabRows]:
    module = getattr(model, MODULE_NAME, None)
    return module if isinstance(module, VocabRows) else None


def attach(model: nn.Module, config: LisaConfig) -> Optional[VocabRows]:
    """Under embedding_update="rows", add the VocabRows module and its hooks to `model` (once; a
    second call returns the first module) and return it; otherwise None. Call it before an engine
    wraps the model (FSDP2's fully_shard, deepspeed.initialize), so the deltas are the engine's
    parameters like any other. Works on the meta device (the planner's skeleton): no hook fires there."""
    if config.embedding_update != "rows":
        return None
    existing = find(model)
    if existing is not None:
        if existing.capacity != config.embedding_rows:
            raise ValueError(f"the model already has {MODULE_NAME} with {existing.capacity} rows but "
                             f"LisaConfig.embedding_rows is {config.embedding_rows}")
        return existing
    embed = input_embeddings(model)
    head = output_embeddings(model)
    train_embed = config.train_embeddings and embed is not None
    train_head = config.train_head and head is not None
    if not (train_embed or train_head):
        return None
    if embed is None:
        raise ValueError(f"embedding_update=\"rows\" needs {type(model).__name__}.get_input_embeddings(): the rows "
                         "that train are those of the token ids fed to it; use embedding_update=\"dense\"")
    ref = embed.weight
    vocab, hidden = _shape(ref)
    tied = head is not None and head.weight is embed.weight
    if head is not None and not tied and _shape(head.weight) != (vocab, hidden):
        raise ValueError(f"embedding_update=\"rows\": the LM head's weight is {_shape(head.weight)} but the "
                         f"input embeddings' is {(vocab, hidden)}; row deltas need both to be vocab x hidden")
    rows = VocabRows(config.embedding_rows, vocab, hidden, embed=train_embed, head=train_head, tied=tied,
                     dtype=ref.dtype, device=ref.device)
    embed.register_forward_hook(_embedding_hook(rows))
    if head is not None and rows.head_delta is not None:
        head.register_forward_hook(_head_hook(rows))
    model.add_module(MODULE_NAME, rows)
    return rows


def _shape(weight: torch.Tensor) -> Tuple[int, ...]:
    # ZeRO-3 partitions parameters in place (shape (0,)); ds_shape keeps the full one.
    return tuple(getattr(weight, "ds_shape", None) or weight.shape)


def _embedding_hook(rows: VocabRows):
    """Tracks the fed token ids (which also decides the head's rows) and adds the embedding delta."""
    def hook(module: nn.Module, args: Tuple, output: torch.Tensor) -> torch.Tensor:
        ids = args[0] if args else None
        if not torch.is_tensor(ids) or output.device.type == "meta":
            return output
        # Grad enabled is what "training" means here: HF models come out of from_pretrained in eval
        # mode and many loops never call .train(); evaluation and generate() run under no_grad.
        if torch.is_grad_enabled() and any(p.requires_grad for p in rows.parameters()):
            if rows.embed is not None:
                rows.check_scale(module, ids, output)
            rows.track(ids)
        if rows.embed is None:
            return output
        return output + rows(ids=ids, scale=_embedding_scale(module), padding_idx=getattr(module, "padding_idx", None))
    return hook


def _head_hook(rows: VocabRows):
    def hook(module: nn.Module, args: Tuple, output: torch.Tensor) -> torch.Tensor:
        if not args or output.device.type == "meta":
            return output
        return rows(hidden=args[0], logits=output)
    return hook


def trained_weights(model: nn.Module) -> Dict[str, nn.Parameter]:
    """{"embed": input-embedding weight, "head": LM-head weight} that a VocabRows module replaces
    in training (frozen under embedding_update="rows")."""
    rows = find(model)
    if rows is None:
        return {}
    out = {}
    if rows.embed is not None:
        out["embed"] = input_embeddings(model).weight
    if rows.head is not None:
        out["head"] = output_embeddings(model).weight
    return out


@torch.no_grad()
def merged_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state` (a full state dict, e.g. gathered for export) with the row deltas added into the
    embedding and head weights and the VocabRows entries removed: the trained model as a plain
    checkpoint. `model` only names the weights: the trained model itself or a plain skeleton of
    the same architecture (lisa-export's, on the meta device). Every alias of a tied weight gets the
    same merged tensor. Returns `state` unchanged when it holds no VocabRows entries."""
    prefix = MODULE_NAME + "."
    if prefix + "rows" not in state:
        return state
    rows = state[prefix + "rows"]
    n = int((rows >= 0).sum())
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for kind, module in (("embed", input_embeddings(model)), ("head", output_embeddings(model))):
        if prefix + kind not in state or module is None:
            continue
        keys = [k for k, p in model.named_parameters(remove_duplicate=False) if p is module.weight and k in out]
        if not keys:
            raise ValueError(f"the state dict has {prefix + kind} but no {kind} weight to merge it into")
        merged = out[keys[0]].clone()
        delta = state[prefix + kind][:n]
        merged.index_add_(0, rows[:n].to(merged.device), delta.to(device=merged.device, dtype=merged.dtype))
        for key in keys:
            out[key] = merged
    return out
