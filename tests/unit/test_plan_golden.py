"""The dry run's peak on a shape small enough to count by hand: golden byte counts, each derived in
the comments from what autograd saves for backward, not read off the code under test.

The model: token ids (B=2, S=4: N=8 tokens) -> embedding (V=16 x H=8) -> linear H x H ("layer") ->
head H x V -> cross-entropy, all fp32 (4 bytes), so an N x H tensor is 256 B and an N x V one 512 B.
"""
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lisa_dist.memory import model_state_floor
from lisa_dist.recipe.plan_memory import Engine, Shape, combine
from lisa_dist.recipe.step_trace import StepTrace, trace_step

B, S, H, V, R = 2, 4, 8, 16, 2
N = B * S
NH, NV, NR = 4 * N * H, 4 * N * V, 4 * N * R  # 256, 512, 64 bytes
SCALAR = 4  # the loss, nll_loss's total_weight and the backward's seed gradient: 0-d fp32


class Tiny(nn.Module):
    def __init__(self, lora: bool = False):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.layer = nn.Linear(H, H, bias=False)
        self.head = nn.Linear(H, V, bias=False)
        self.lora = lora
        if lora:  # a LoRA adapter of rank R beside the layer: b(a(x))
            self.a = nn.Linear(H, R, bias=False)
            self.b = nn.Linear(R, H, bias=False)

    def forward(self, input_ids, labels):
        x = self.embed(input_ids)
        h = self.layer(x)
        if self.lora:
            h = h + self.b(self.a(x))
        logits = self.head(h)
        return types.SimpleNamespace(loss=F.cross_entropy(logits.view(-1, V), labels.view(-1)))


def _trace(trained, lora=False) -> StepTrace:
    with torch.device("meta"):
        model = Tiny(lora)
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] in trained)
    return trace_step(model, B, S)


# At the end of forward, whatever the method: log_softmax's output (N x V, saved by its backward and
# by nll_loss), the loss and nll_loss's total_weight. The logits themselves are not kept: the head's
# backward needs only its weight for the input gradient (and h, for its own weight gradient).
LOSS_SAVED = NV + 2 * SCALAR
# The backward peak is at log_softmax's backward: the seed gradient, nll_loss's gradient (N x V) and
# log_softmax's input gradient (N x V) are alive together, nll_loss's total_weight already released.
LOSS_BACKWARD = SCALAR + NV + NV - SCALAR


@pytest.mark.parametrize("name, trained, lora, saved", [
    # LISA with the embeddings and head frozen, the layer active: the layer keeps its input x for its
    # weight gradient; nothing else of the decoder is kept.
    ("lisa-frozen", {"layer"}, False, NH),
    # Only the embedding trains, the layer is frozen: a frozen linear needs just its weight for the input
    # gradient, so x is not kept (the embedding's backward needs the ids, which existed before).
    ("frozen-linear", {"embed"}, False, 0),
    # LoRA on the frozen layer: a keeps x (for a's weight gradient), b keeps a's output (N x R).
    ("lora", {"a", "b"}, True, NH + NR),
    # Everything trains: the layer keeps x, the head keeps h (for its weight gradient).
    ("full", {"embed", "layer", "head"}, False, 2 * NH),
])
def test_trace_matches_hand_count(name, trained, lora, saved):
    traced = _trace(trained, lora)
    assert traced.forward_end == saved + LOSS_SAVED, name
    assert traced.backward_peak == saved + LOSS_SAVED + LOSS_BACKWARD, name
    assert not traced.math_attention


def test_zero2_engine_terms_by_hand():
    """combine() for DeepSpeed ZeRO-2 on 4 ranks, bf16 weights, a 1,000-element reduce bucket with
    overlap_comm (two buckets): every term written out from the ZeRO-2 floor (2 Psi weights; 2, 4 and
    8 bytes per trained parameter of gradient, master and moments, sharded over N)."""
    psi, trained, n = 10_000, 2_000, 4
    states = model_state_floor("zero2", psi, trained, n, 2)
    assert states == {"weights": 20_000, "grads": 1_000, "master": 2_000, "optimizer_state": 4_000,
                      "total": 27_000}
    trace = StepTrace(forward_end=776, backward_peak=1800, step_peak=1800, math_attention=False)
    shape = Shape(trainable=trained, largest_layer=1_000, largest_trained_layer=1_000, outside=0,
                  outside_trained=0, head=0)
    zero = {"reduce_bucket_size": 1_000, "overlap_comm": True, "contiguous_gradients": True}
    gpu = combine(Engine("zero2", n, 2, "cuda", zero), states, shape, trace)
    assert gpu.resident == 27_000 - 1_000  # gradients are freed at zero_grad
    assert gpu.buffers["ipg_buckets"] == 2 * 1_000 * 2  # two buckets of 1,000 bf16 elements
    assert gpu.backward == 1800 + 4_000 + 1_000  # traced step + buckets + the reduced gradient partition
    # step: the partition (1,000 B), its flattened copy (2 x 2,000 / 4) and its fp32 copy (4 x 2,000 / 4)
    assert gpu.optimizer_step == 1_000 + 1_000 + 2_000
    assert (gpu.rise, gpu.peak, gpu.phase) == (6_800, 32_800, "backward")
    # On a CPU only the written pages of a bucket are resident: of a 5e8-element bucket a step writes at
    # most the 2,000 trained elements, so each bucket costs 2 x 2,000 bytes there (a GPU holds 1e9).
    cpu = combine(Engine("zero2", n, 2, "cpu", {**zero, "reduce_bucket_size": 5e8}), states, shape, trace)
    assert cpu.buffers["ipg_buckets"] == 2 * 2_000 * 2


def test_zero3_keeps_what_backward_reuses_soon():
    """ZeRO-3 releases a module's gathered parameters after it runs unless they are fetched again within
    stage3_max_reuse_distance elements. With a distance of 1,000, a head of 300 and layers of 200: the top
    layer is reused after the head alone (300 <= 1,000: kept), the next after the top layer twice and the
    head (700: kept), the third after 2 x 400 + 300 = 1,100 (released). Kept at the loss: 300 + 2 x 200."""
    from lisa_dist.recipe.plan_memory import zero3_kept_gathered

    engine = Engine("zero3", 2, 2, "cuda", {"stage3_max_reuse_distance": 1_000})
    shape = Shape(trainable=400, largest_layer=200, largest_trained_layer=200, outside=300, outside_trained=0,
                  head=300, num_layers=5)
    assert zero3_kept_gathered(engine, shape) == 700
    # A model smaller than half the distance stays gathered whole: every layer and the head.
    assert zero3_kept_gathered(Engine("zero3", 2, 2, "cuda", {}), shape) == 300 + 5 * 200
