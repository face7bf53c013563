"""Loading helpers in-process: meta-device construction, missing safetensors, ZeRO-3 row ranges."""
from __future__ import annotations

import pytest
import torch

from builders import write_checkpoint


def test_meta_parameters_keeps_buffers_and_ties(tmp_path):
    from lisa_dist.recipe.modeling import build_empty_model_and_tokenizer, build_model_and_tokenizer

    write_checkpoint(tmp_path, tied=True, num_layers=2, hidden_size=64)
    empty, _ = build_empty_model_and_tokenizer(str(tmp_path), torch.float32)
    whole, _ = build_model_and_tokenizer(str(tmp_path), torch.float32)
    assert all(p.device.type == "meta" for p in empty.parameters())
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    buffers = dict(whole.named_buffers())
    assert buffers and all(torch.equal(b, buffers[n]) for n, b in empty.named_buffers())

def test_a_checkpoint_without_safetensors_is_a_clear_error(tmp_path):
    from lisa_dist.loading import safetensors_files

    with pytest.raises(ValueError, match="safe_serialization=True"):
        safetensors_files(tmp_path)

def test_read_flat_range_reads_every_zero3_partition(tmp_path):
    """Each rank's partition range (ceil(numel / N) elements, the last one short) of tensors whose
    rows straddle partition boundaries, read from a real safetensors file, equals the same range of
    the flattened tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lisa_dist.backends.deepspeed.loading import read_flat_range

    tensors = {"matrix": torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5),
               "cube": torch.arange(3 * 4 * 5, dtype=torch.bfloat16).reshape(3, 4, 5),
               "vector": torch.arange(11, dtype=torch.float32), "scalar": torch.tensor(3.5)}
    save_file(tensors, tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        for name, whole in tensors.items():
            flat, numel = whole.reshape(-1), whole.numel()
            for world in (1, 2, 3, 4, 8):
                size = -(-numel // world)
                for rank in range(world):
                    start = rank * size
                    count = max(0, min(size, numel - start))
                    if count:
                        got = read_flat_range(f.get_slice(name), tuple(whole.shape), start, count)
                        assert torch.equal(got, flat[start:start + count]), (name, world, rank)


def test_loading_starts_row_deltas_empty(tmp_path):
    """lisa-train's fsdp2 path with embedding_update="rows": the deltas are attached on the meta device,
    materialized (undefined contents), then the checkpoint, which has none, is loaded: no slot taken,
    zero deltas, the pretrained weights."""
    from lisa_dist import LisaConfig, loading, vocab_rows
    from lisa_dist.recipe.modeling import build_empty_model_and_tokenizer, build_model_and_tokenizer

    write_checkpoint(tmp_path, tied=True, num_layers=2, hidden_size=64)
    empty, _ = build_empty_model_and_tokenizer(str(tmp_path), torch.float32)
    rows = vocab_rows.attach(empty, LisaConfig(embedding_update="rows", embedding_rows=16))
    assert rows.embed.device.type == "meta" and rows.head is None  # tied: one delta
    loading.materialize(empty, torch.device("cpu"))
    with torch.no_grad():
        rows.embed.fill_(1.0)
        rows.rows.fill_(3)
    loading.load_safetensors(empty, tmp_path)
    assert rows.used() == 0 and torch.count_nonzero(rows.embed) == 0
    whole, _ = build_model_and_tokenizer(str(tmp_path), torch.float32)
    assert torch.equal(empty.model.embed_tokens.weight, whole.model.embed_tokens.weight)
