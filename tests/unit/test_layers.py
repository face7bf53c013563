"""Decoder-layer discovery and parameter splitting on tiny random-init transformers models."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
import transformers as T
from torch import nn

from lisa_dist import LisaConfig, find_decoder_layers, split_parameters
from lisa_dist.layers import tied_freeze_problem

TOKENS = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TEXT = dict(TOKENS, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
VISION_LAYERS = 3  # differs from the text depth so a wrong pick shows in the count too


def _llava() -> nn.Module:
    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=VISION_LAYERS,
                                num_attention_heads=4, image_size=28, patch_size=14, projection_dim=32)
    return T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vision, text_config=T.LlamaConfig(**TEXT),
                                                         image_token_index=127))


def _qwen2_vl() -> nn.Module:
    text = dict(TEXT, rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2]))
    vision = dict(depth=VISION_LAYERS, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2)
    return T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(text_config=text, vision_config=vision))


def _gemma3() -> nn.Module:
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=VISION_LAYERS, num_attention_heads=4,
                  image_size=28, patch_size=14)
    return T.Gemma3ForConditionalGeneration(T.Gemma3Config(text_config=dict(TEXT, head_dim=8), vision_config=vision,
                                                           mm_tokens_per_image=4))


BUILDERS = {
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**TEXT)), "model.layers"),
    "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**TEXT)), "model.layers"),
    "mixtral": (lambda: T.MixtralForCausalLM(T.MixtralConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2)),
                "model.layers"),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**TEXT)), "model.layers"),
    "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**TEXT, head_dim=8)), "model.layers"),
    "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**TEXT, head_dim=8)), "model.layers"),
    "gemma2": (lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**TEXT, head_dim=8)), "model.layers"),
    "phi": (lambda: T.PhiForCausalLM(T.PhiConfig(**TEXT)), "model.layers"),
    "phi3": (lambda: T.Phi3ForCausalLM(T.Phi3Config(**TEXT)), "model.layers"),
    "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(**TOKENS, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
             "transformer.h"),
    "gpt_neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**TEXT)), "gpt_neox.layers"),
    "falcon": (lambda: T.FalconForCausalLM(T.FalconConfig(**TOKENS, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4)), "transformer.h"),
    "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(**TOKENS, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                 num_attention_heads=4, word_embed_proj_dim=32,
                                                 max_position_embeddings=64)), "model.decoder.layers"),
    "glm": (lambda: T.GlmForCausalLM(T.GlmConfig(**TEXT, head_dim=8)), "model.layers"),
    # hybrid stack: attention and Mamba blocks of different classes in one ModuleList
    "jamba": (lambda: T.JambaForCausalLM(T.JambaConfig(**TEXT, attn_layer_period=2, attn_layer_offset=1,
                                                       expert_layer_period=2, num_experts=2, mamba_d_state=4,
                                                       mamba_dt_rank=4)), "model.layers"),
    "llava": (_llava, "model.language_model.layers"),
    "qwen2_vl": (_qwen2_vl, "model.language_model.layers"),
    "gemma3": (_gemma3, "model.language_model.layers"),
}
VISION_PATHS = {"llava": "model.vision_tower.encoder.layers", "qwen2_vl": "model.visual.blocks",
                "gemma3": "model.vision_tower.encoder.layers"}


@functools.cache
def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[arch][0]()


def assert_exact_partition(model: nn.Module, split) -> None:
    listed = split.always + split.frozen_outside + [np for layer in split.per_layer for np in layer]
    assert len({id(p) for _, p in listed}) == len(listed), "a parameter is listed twice"
    assert sorted(n for n, _ in listed) == sorted(n for n, _ in model.named_parameters())
    assert {id(p) for _, p in listed} == {id(p) for p in model.parameters()}
    for i, layer in enumerate(split.per_layer):
        assert layer, f"layer {i} has no parameters"
        assert all(n.startswith(f"{split.layers_path}.{i}.") for n, _ in layer)
        in_block = [n for n, _ in model.named_parameters() if n.startswith(f"{split.layers_path}.{i}.")]
        assert [n for n, _ in layer] == in_block
    for name, _ in split.always + split.frozen_outside:
        assert not name.startswith(split.layers_path + ".")


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_finds_decoder_layers_and_partitions_parameters(arch: str) -> None:
    model = build(arch)
    expected_path = BUILDERS[arch][1]
    found = find_decoder_layers(model)
    assert found.path == expected_path
    assert found.layers is model.get_submodule(expected_path)
    assert len(found.layers) == 2

    split = split_parameters(model, LisaConfig())
    assert split.layers_path == expected_path and split.num_layers == 2
    assert_exact_partition(model, split)
    assert split.frozen_outside == []  # both flags default to True
    embed_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    assert embed_ids <= {id(p) for p in split.always_params}


@pytest.mark.parametrize("arch", list(VISION_PATHS))
def test_vlm_override_wins(arch: str) -> None:
    model = build(arch)
    split = split_parameters(model, LisaConfig(layers_path=VISION_PATHS[arch]))
    assert split.layers_path == VISION_PATHS[arch] and split.num_layers == VISION_LAYERS
    assert_exact_partition(model, split)
    language = BUILDERS[arch][1]
    assert any(n.startswith(language + ".") for n, _ in split.always)  # now outside the blocks


@pytest.mark.parametrize("arch", list(VISION_PATHS))
def test_vlm_vision_tower_is_head_side(arch: str) -> None:
    model = build(arch)
    split = split_parameters(model, LisaConfig(train_head=False))
    vision_root = VISION_PATHS[arch].split(".")[:2]  # e.g. model.vision_tower / model.visual
    frozen = {n for n, _ in split.frozen_outside}
    vision = {n for n, _ in model.named_parameters() if n.split(".")[:2] == vision_root}
    assert vision and vision <= frozen
    assert {n for n, _ in split.always} == {n for n, _ in model.named_parameters()
                                            if n.startswith("model.language_model.embed_tokens.")}


def test_flags_untied_llama() -> None:
    model = build("llama")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    names = lambda pairs: {n for n, _ in pairs}  # noqa: E731

    split = split_parameters(model, LisaConfig(train_embeddings=False))
    assert names(split.frozen_outside) == {"model.embed_tokens.weight"}
    assert names(split.always) == {"model.norm.weight", "lm_head.weight"}

    split = split_parameters(model, LisaConfig(train_head=False))
    assert names(split.always) == {"model.embed_tokens.weight"}
    assert names(split.frozen_outside) == {"model.norm.weight", "lm_head.weight"}

    split = split_parameters(model, LisaConfig(train_embeddings=False, train_head=False))
    assert split.always == [] and len(split.frozen_outside) == 3
    assert_exact_partition(model, split)


@pytest.mark.parametrize("train_embeddings,train_head,tied_trains",
                         [(True, True, True), (True, False, True), (False, True, True), (False, False, False)])
def test_tied_embedding_counted_once(train_embeddings: bool, train_head: bool, tied_trains: bool) -> None:
    model = build("gemma")
    tied = model.get_input_embeddings().weight
    assert model.lm_head.weight is tied
    config = LisaConfig(train_embeddings=train_embeddings, train_head=train_head)
    # One side frozen alone leaves the tied tensor trainable: say so, naming both settings and flags.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = split_parameters(model, config)
    problem = tied_freeze_problem(model, config)
    if train_embeddings == train_head:
        assert problem is None and not caught
    else:
        assert [str(w.message) for w in caught] == [problem]
        for needle in ("model.embed_tokens.weight", "train_embeddings=False and train_head=False",
                       "--no-train-embeddings and --no-train-head"):
            assert needle in problem
    assert_exact_partition(model, split)
    assert [id(p) for p in split.always_params].count(id(tied)) == int(tied_trains)
    assert [id(p) for _, p in split.frozen_outside].count(id(tied)) == int(not tied_trains)
    norm_place = split.always if train_head else split.frozen_outside
    assert "model.norm.weight" in {n for n, _ in norm_place}


def test_layer_params_in_model_order() -> None:
    split = split_parameters(build("llama"), LisaConfig())
    assert split.layer_params({1, 0}) == [p for _, p in split.per_layer[0] + split.per_layer[1]]
    assert split.layer_params([]) == []
    with pytest.raises(ValueError, match="out of range"):
        split.layer_params([2])


class Block(nn.Module):
    def __init__(self, width: int = 8, experts: int = 0):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))


class Toy(nn.Module):
    def __init__(self, embed: nn.Module, **lists: nn.ModuleList):
        super().__init__()
        self.embed = embed
        for name, value in lists.items():
            setattr(self, name, value)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed


def test_moe_expert_lists_are_not_candidates() -> None:
    model = Toy(nn.Embedding(16, 8), layers=nn.ModuleList(Block(experts=8) for _ in range(2)))
    found = find_decoder_layers(model)
    assert found.path == "layers" and len(found.layers) == 2


def test_tie_broken_by_parameter_count() -> None:
    model = Toy(nn.Embedding(16, 8), small=nn.ModuleList(Block(4) for _ in range(3)),
                big=nn.ModuleList(Block(8) for _ in range(2)))
    assert find_decoder_layers(model).path == "big"


def test_embedding_list_is_not_a_decoder_stack() -> None:
    # per-codebook embeddings outweigh the blocks and share their parent, yet are not the stack
    model = Toy(nn.ModuleList(nn.Embedding(1000, 8) for _ in range(4)), layers=nn.ModuleList(Block() for _ in range(2)))
    assert find_decoder_layers(model).path == "layers"


def assert_hint(message: str) -> None:
    assert 'layers_path="' in message and "--layers-path" in message


def test_no_module_list_error() -> None:
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ValueError) as err:
        find_decoder_layers(mlp)
    assert "no nn.ModuleList" in str(err.value) and "Sequential" in str(err.value)
    assert_hint(str(err.value))


def test_zero_layer_model_error() -> None:
    model = T.LlamaForCausalLM(T.LlamaConfig(**dict(TEXT, num_hidden_layers=0)))
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        split_parameters(model, LisaConfig())
    with pytest.raises(ValueError, match="empty ModuleList"):
        split_parameters(model, LisaConfig(layers_path="model.layers"))


def test_ambiguous_error_lists_candidates() -> None:
    model = Toy(nn.Embedding(16, 8), encoder=nn.ModuleList(Block() for _ in range(2)),
                decoder=nn.ModuleList(Block() for _ in range(2)))
    with pytest.raises(ValueError) as err:
        find_decoder_layers(model)
    message = str(err.value)
    assert "equally plausible" in message
    assert "encoder (2 x Block" in message and "decoder (2 x Block" in message
    assert_hint(message)
    assert find_decoder_layers(model, "decoder").path == "decoder"


def test_bad_override_errors() -> None:
    model = build("llava")
    with pytest.raises(ValueError) as err:
        find_decoder_layers(model, "model.language_model.blocks")
    message = str(err.value)
    assert "has no submodule 'blocks'" in message and "layers" in message  # names what is there
    assert "model.language_model.layers (2 x LlamaDecoderLayer" in message
    assert "model.vision_tower.encoder.layers (3 x CLIPEncoderLayer" in message

    with pytest.raises(ValueError) as err:
        split_parameters(model, LisaConfig(layers_path="model.language_model.norm"))
    assert "LlamaRMSNorm, not an nn.ModuleList" in str(err.value)
    assert "model.language_model.layers (2 x LlamaDecoderLayer" in str(err.value)
