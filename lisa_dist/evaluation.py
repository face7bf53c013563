"""Held-out loss: the causal-LM cross-entropy summed over label tokens, in eval mode without gradients.

Sums, not the model's per-batch mean: a batch's mean weighs its tokens by 1 / (its own token count),
so averaging batch means depends on how examples fall into batches and ranks. The sum of token
losses and the token count add up across batches and ranks; their ratio is the token-weighted mean
over the whole set, whatever the batch size or world size (up to float rounding).
"""
from __future__ import annotations

from typing import Mapping, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
"""Label value that contributes no loss (prompts, padding), as in Hugging Face's causal-LM loss."""


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies in fp32, number of label tokens) of one batch.

    The shift of transformers' causal-LM loss: logits at position t predict labels[t + 1], labels
    are aligned with input_ids, and IGNORE_INDEX positions count nothing.
    """
    shifted = labels[:, 1:].to(logits.device)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    # One row's fp32 logits at a time: [batch, length, vocab] in fp32 at once can be gigabytes.
    for row in range(logits.shape[0]):
        total += F.cross_entropy(logits[row, :-1].float(), shifted[row], ignore_index=IGNORE_INDEX,
                                 reduction="sum").double()
    return total, (shifted != IGNORE_INDEX).sum()


def loss_sums(module: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], device: torch.device,
              world_size: int = 1) -> Tuple[float, int]:
    """(sum of token losses, label tokens) of `module` over `batches`, summed over the ranks when
    world_size > 1 (one all-reduce; every rank must pass the same number of batches, since ZeRO-3's
    and FSDP2's forwards gather parameters collectively).

    `module` is the model, or whatever wraps it and forwards to it (a DeepSpeed engine, an FSDP2
    root): it runs in eval mode (no dropout) under no_grad and is put back in the mode it was in.
    Batches hold input_ids, attention_mask and labels (on the host; moved to `device`).
    """
    was_training = module.training
    module.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                # No KV cache: nothing is generated, and a cache holds every layer's keys and values.
                logits = module(**inputs, use_cache=False).logits
                total, count = token_loss_sum(logits, batch["labels"])
                sums[0] += total
                sums[1] += count
                del logits
    finally:
        module.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)
    return sums[0].item(), int(sums[1].item())
