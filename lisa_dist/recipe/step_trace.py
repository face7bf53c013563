"""What a training step allocates on top of the model states, traced on the meta device.

The dry run builds the model on the meta device (shapes and dtypes, no storage), sets what trains,
and runs forward, the loss, backward and (for one process) the optimizer step on meta input ids of
the run's shape, counting every tensor storage that an operator creates and that is still alive:
the activations autograd saves (each storage once, so views and tensors shared between layers count
once), the logits and the loss's upcast copies, gradients, recomputation under gradient
checkpointing and the optimizer's temporaries. The per-operator bookkeeping is exact by
construction; what it cannot see is what a kernel allocates inside itself (cuBLAS or flash-attention
workspaces) and the allocator's rounding. Measured against the resident memory of real steps in
benchmarks/planner_validation.py.

Two things differ between the meta device and the kernels a job runs:
- attention: `scaled_dot_product_attention` on meta always takes the math path, which saves the
  S x S probabilities; CPUs and GPUs run a fused kernel (flash / memory-efficient) that saves the
  output and a logsumexp row. The trace registers an attention implementation with transformers
  that calls the fused kernel; a model that does not dispatch through transformers' attention
  interface falls back to the math path, which the trace reports (an over-estimate).
- data-dependent checks: transformers asks whether a mask is all ones or position ids are packed;
  on meta every boolean answers True (an unpadded, unpacked batch: causal attention without a mask).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Set

import torch

from lisa_dist.backends import torch_compat

ATTENTION = "lisa_dist_meta_sdpa"
"""The attention implementation the trace registers with transformers (see `fused_sdpa_forward`)."""


@dataclass
class StepTrace:
    """Bytes alive beyond what existed before the traced step, at its moments."""

    forward_end: int
    """After forward and the loss: what autograd saved for backward, the logits and the loss's copies."""

    backward_peak: int
    """The most alive at any moment of forward + backward (the peak is usually at the loss's backward)."""

    step_peak: int
    """The most alive at any moment of the whole step, optimizer step included when one was traced."""

    math_attention: bool
    """True when attention ran through the math path (it keeps S x S probabilities; a fused kernel does not)."""


class _Tracker:
    """Counts the storages operators create and that are still alive (a TorchDispatchMode, built lazily
    through torch_compat so the private base class is probed first)."""

    def __init__(self):
        self.live = 0
        self.peak = 0
        self.math_attention = False
        self._sizes: Dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def handle(self, func, args, kwargs):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            if args[0].dtype == torch.bool:
                return True  # "is the mask all ones / are the sequences unpacked?": an unpadded batch
            raise ValueError(f"the model reads a {args[0].dtype} value out of a tensor during forward, which a "
                             "meta-device trace cannot answer; plan it with a model that does not")
        if func is torch.ops.aten._safe_softmax.default:
            self.math_attention = True
        out = func(*args, **kwargs)
        inputs: Set[int] = {id(t.untyped_storage()) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._sizes:  # a view or an in-place result: nothing new
                continue
            self._sizes[key] = storage.nbytes()
            self.live += self._sizes[key]
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


@contextlib.contextmanager
def tracking() -> Iterator[_Tracker]:
    tracker = _Tracker()

    class Mode(torch_compat.dispatch_mode_class()):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return tracker.handle(func, args, kwargs or {})

    with Mode():
        yield tracker


def fused_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' `sdpa_attention_forward` for training shapes (no cache), calling the fused kernel
    that CPUs and GPUs run instead of `scaled_dot_product_attention`, which on meta takes the math path.
    Key/value heads are repeated exactly where transformers repeats them (a mask with grouped heads),
    so what is saved for backward matches."""
    from transformers.integrations import sdpa_attention

    if kwargs.get("position_bias") is not None:  # relative position biases: transformers' own path
        return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and not sdpa_attention.use_gqa_in_sdpa(attention_mask, key, value):
        key = sdpa_attention.repeat_kv(key, groups)
        value = sdpa_attention.repeat_kv(value, groups)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    out = torch_compat.fused_attention(query, key, value, attention_mask, is_causal, scaling,
                                       dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def use_fused_attention(model) -> bool:
    """Route the meta model's attention through `fused_sdpa_forward` (registered once with transformers'
    attention and mask interfaces, the mask built as for sdpa). False when the model cannot switch
    (custom attention code): it then traces the math path."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, fused_sdpa_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", ATTENTION):
        return False  # eager or flash attention asked for explicitly: trace what the model runs
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, ImportError, AttributeError):
        return False
    return model.config._attn_implementation == ATTENTION


def trace_step(model, batch_size: int, seq_len: int, *, optimizer=None,
               keep_grad: Callable[[torch.nn.Parameter], bool] = lambda p: True,
               before_step: Optional[Callable[[], None]] = None) -> StepTrace:
    """Trace the second of two steps of `model` (meta parameters, trainable ones requiring grad) on
    (batch_size, seq_len) token ids: forward with labels, backward, then `optimizer.step()` and
    `zero_grad()` when an optimizer is given. The first step allocates what an optimizer keeps (Adam
    moments), so the second shows a steady step. Gradients of parameters for which `keep_grad` is
    False are freed as soon as they are accumulated, as engines do that move them into their own
    buffers (those buffers are the engine's, counted by the planner)."""
    device = next(model.parameters()).device
    if device.type != "meta":
        raise ValueError(f"trace_step runs on a meta-device model, got parameters on {device}")
    hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in model.parameters()
             if p.requires_grad and not keep_grad(p)]
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    marks: Dict[str, int] = {}
    try:
        with tracking() as tracker:
            for step in range(2):
                start = tracker.live
                tracker.reset_peak()
                loss = model(input_ids=ids, labels=ids).loss
                forward_end = tracker.live
                loss.backward()
                del loss
                backward_peak = tracker.peak
                if optimizer is not None:
                    if before_step is not None:
                        before_step()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                marks = {"start": start, "forward_end": forward_end, "backward_peak": backward_peak,
                         "step_peak": tracker.peak}
    finally:
        for h in hooks:
            h.remove()
    return StepTrace(forward_end=marks["forward_end"] - marks["start"],
                     backward_peak=marks["backward_peak"] - marks["start"],
                     step_peak=marks["step_peak"] - marks["start"], math_attention=tracker.math_attention)


def _tensors(tree) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _drop_grad(p: torch.nn.Parameter) -> None:
    p.grad = None
