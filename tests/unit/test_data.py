"""Data pipeline and the embedded default (tokenizer, shipped data, tiny-llama preset)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lisa_dist.recipe.data import (
    IGNORE_INDEX,
    BatchIterator,
    build_dataset,
    collate,
    detect_format,
    format_alpaca_prompt,
    load_jsonl,
    tokenize_dataset,
    tokenize_example,
)
from lisa_dist.recipe.presets import (
    ASSETS_DIR,
    CHAT_DATA,
    DEFAULT_DATA,
    PRESETS,
    TEXT_DATA,
    default_tokenizer,
    tiny_llama_config,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---- formats and masking -------------------------------------------------------------------------

def test_alpaca_trains_on_output_and_eos_only(tok):
    record = {"instruction": "Add the two numbers.", "input": "12 + 7", "output": "19"}
    ex = tokenize_example(record, tok, 128)
    assert trained_text(tok, ex) == "19</s>"
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    n_prompt = sum(t == IGNORE_INDEX for t in ex["labels"])
    assert tok.decode(ex["input_ids"][:n_prompt]) == "<s>" + format_alpaca_prompt(record)
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    # An empty input drops the Input section rather than leaving it blank.
    no_input = tokenize_example({"instruction": "Name a colour.", "input": "", "output": "red"}, tok, 128)
    assert "### Input" not in tok.decode(no_input["input_ids"])
    assert trained_text(tok, no_input) == "red</s>"


def test_chat_trains_on_every_assistant_turn_only(tok):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add the two numbers.\n2 + 3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]}
    ex = tokenize_example(record, tok, 256)
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(record["messages"], tokenize=False)
    spans, current = [], []
    for token, label in zip(ex["input_ids"], ex["labels"]):
        if label == IGNORE_INDEX:
            if current:
                spans.append(tok.decode(current))
            current = []
        else:
            assert label == token
            current.append(label)
    spans.append(tok.decode(current))
    assert spans == ["5</s>", "The capital of France is Paris.</s>"]


def test_text_trains_on_everything(tok):
    ex = tokenize_example({"text": "The capital of Peru is Lima."}, tok, 64)
    assert ex["labels"] == ex["input_ids"]
    assert tok.decode(ex["input_ids"]) == "<s>The capital of Peru is Lima.</s>"


@pytest.mark.parametrize("path,fmt", [(DEFAULT_DATA, "alpaca"), (CHAT_DATA, "chat"), (TEXT_DATA, "text")])
def test_shipped_files_build_in_their_format(tok, path, fmt):
    records = load_jsonl(path)
    assert {detect_format(r) for r in records} == {fmt}
    dataset = build_dataset(path, tok, max_length=128, fmt=fmt)
    assert len(dataset) == len(records)
    assert all(len(e["input_ids"]) == len(e["labels"]) <= 128 for e in dataset)


def test_truncation_keeps_the_head(tok):
    record = {"instruction": "Repeat the word three times.", "input": "apple", "output": "apple apple apple"}
    full = tokenize_example(record, tok, 512)
    cut = tokenize_example(record, tok, len(full["input_ids"]) - 2)
    assert cut["input_ids"] == full["input_ids"][:-2] and cut["labels"] == full["labels"][:-2]


def test_detect_format_precedence_and_unknown():
    # tatsu-lab/alpaca carries a rendered "text" beside the structured fields.
    assert detect_format({"instruction": "a", "output": "b", "text": "c", "id": 3}) == "alpaca"
    assert detect_format({"messages": [], "text": "c"}) == "chat"
    with pytest.raises(ValueError, match="alpaca.*chat.*text"):
        detect_format({"prompt": "a", "completion": "b"})


def test_format_names_are_checked(tok):
    with pytest.raises(ValueError, match="unknown data format 'sharegpt'"):
        tokenize_example({"text": "x"}, tok, 16, fmt="sharegpt")
    with pytest.raises(ValueError, match="'text' shape but fmt='chat'"):
        tokenize_example({"text": "x"}, tok, 16, fmt="chat")


# ---- errors --------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_malformed_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", ['{"text": "ok"}', "", '{"text": "broken"'])
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 3 is not valid JSON \(Expecting"):
        load_jsonl(path)


@pytest.mark.parametrize("lines", [[], ["", "   "]])
def test_empty_file(tmp_path, lines):
    with pytest.raises(ValueError, match="no examples"):
        load_jsonl(write(tmp_path / "empty.jsonl", lines))


def test_non_object_line(tmp_path):
    with pytest.raises(ValueError, match="line 2 is a JSON list"):
        load_jsonl(write(tmp_path / "list.jsonl", ['{"text": "ok"}', "[1, 2]"]))


def test_unknown_shape_names_line_and_formats(tok, tmp_path):
    path = write(tmp_path / "odd.jsonl", ['{"text": "fine"}', "", '{"prompt": "a", "completion": "b"}'])
    with pytest.raises(ValueError, match=r"odd\.jsonl: line 3: .*no known format.*alpaca.*chat.*text"):
        build_dataset(path, tok)


def test_requested_format_must_match(tok, tmp_path):
    path = write(tmp_path / "mixed.jsonl", ['{"text": "fine"}'])
    with pytest.raises(ValueError, match=r"line 1: .*'text' shape but fmt='alpaca'"):
        build_dataset(path, tok, fmt="alpaca")


def test_bad_chat_records(tok):
    with pytest.raises(ValueError, match="start with a system or user"):
        tokenize_example({"messages": [{"role": "assistant", "content": "hi"}]}, tok, 64)
    with pytest.raises(ValueError, match="at least one assistant"):
        tokenize_example({"messages": [{"role": "user", "content": "hi"}]}, tok, 64)
    with pytest.raises(ValueError, match="role"):
        tokenize_example({"messages": [{"role": "bot", "content": "hi"}]}, tok, 64)


def test_all_truncated_away(tok):
    # The shipped prompts are >= 15 tokens, so at 8 no response token survives.
    with pytest.raises(ValueError, match="max_length=8"):
        build_dataset(DEFAULT_DATA, tok, max_length=8)


def test_partially_truncated_examples_are_dropped(tok, tmp_path):
    long_prompt = json.dumps({"instruction": "word " * 50, "input": "", "output": "x"})
    short = json.dumps({"instruction": "Say x.", "input": "", "output": "x"})
    dataset = build_dataset(write(tmp_path / "d.jsonl", [long_prompt, short]), tok, max_length=20)
    assert len(dataset) == 1 and trained_text(tok, dataset[0]) == "x</s>"


def test_over_length_examples_are_counted_cut_or_dropped(tok, tmp_path):
    long_prompt = json.dumps({"instruction": "word " * 50, "input": "", "output": "x"})
    long_answer = json.dumps({"instruction": "Say x.", "input": "", "output": "x " * 40})
    short = json.dumps({"instruction": "Say x.", "input": "", "output": "x"})
    path = write(tmp_path / "d.jsonl", [long_prompt, long_answer, short, short])
    full = len(tokenize_example(json.loads(long_answer), tok, 10_000)["input_ids"])
    cut, report = tokenize_dataset(path, tok, max_length=20)
    # The long answer is kept without its end and EOS; the long prompt has no label left and goes.
    assert (report.records, report.kept, report.over, report.truncated, report.dropped) == (4, 3, 2, 1, 1)
    assert report.longest == full and report.overlong == "truncate"
    n_short = len(tokenize_example(json.loads(short), tok, 10_000)["input_ids"])
    assert [len(e["input_ids"]) for e in cut] == [20, n_short, n_short] and cut[0]["input_ids"][-1] != tok.eos_token_id
    kept, report = tokenize_dataset(path, tok, max_length=20, overlong="drop")
    assert (report.kept, report.over, report.truncated, report.dropped) == (2, 2, 0, 2)
    assert all(e["input_ids"][-1] == tok.eos_token_id for e in kept)
    assert build_dataset(path, tok, max_length=20, overlong="drop") == kept
    with pytest.raises(ValueError, match="all of them are longer than max_length=5 and overlong='drop'"):
        build_dataset(path, tok, max_length=5, overlong="drop")
    with pytest.raises(ValueError, match="overlong"):
        build_dataset(path, tok, overlong="cut")


def test_alpaca_records_through_the_chat_template(tok):
    record = {"instruction": "Add the two numbers.", "input": "12 + 7", "output": "19"}
    ex = tokenize_example(record, tok, 128, fmt="chat")
    messages = [{"role": "user", "content": "Add the two numbers.\n\n12 + 7"}, {"role": "assistant", "content": "19"}]
    assert tok.decode(ex["input_ids"]) == tok.apply_chat_template(messages, tokenize=False)
    assert trained_text(tok, ex) == "19</s>"
    no_input = tokenize_example({"instruction": "Name a colour.", "output": "red"}, tok, 128, fmt="chat")
    assert "<|user|>\nName a colour.</s>" in tok.decode(no_input["input_ids"])
    # auto keeps the Alpaca prompt, so existing runs train on what they did before.
    assert "### Instruction" in tok.decode(tokenize_example(record, tok, 128)["input_ids"])
    with pytest.raises(ValueError, match="'text' shape but fmt='chat'"):
        tokenize_example({"text": "hello"}, tok, 128, fmt="chat")


def _without_bos(tok):
    """The preset tokenizer with a post-processor that adds nothing, its bos_token still named (as
    SmolLM2's <|im_start|> or GPT-2's <|endoftext|> are)."""
    import copy

    import transformers
    from tokenizers import processors

    backend = copy.deepcopy(tok.backend_tokenizer)
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    plain = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                                 pad_token="<pad>")
    assert plain("a")["input_ids"] == tok("a")["input_ids"][1:] and plain.bos_token_id == tok.bos_token_id
    return plain


def test_bos_only_where_the_tokenizer_adds_one(tok):
    record = {"instruction": "Say hi.", "output": "hi"}
    assert tokenize_example(record, tok, 64)["input_ids"][0] == tok.bos_token_id
    plain = _without_bos(tok)
    ids = tokenize_example(record, plain, 64)["input_ids"]
    assert ids == tokenize_example(record, tok, 64)["input_ids"][1:]
    assert tokenize_example({"text": "hello"}, plain, 64)["input_ids"][0] != plain.bos_token_id


def test_chat_labels_stop_at_the_turn_end_token(tok):
    # A ChatML-style template: a newline follows each turn's end token, as in SmolLM2's and Gemma's.
    chatml = copy_with_template(tok, "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
                                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]}
    ex = tokenize_example(record, chatml, 128)
    assert tok.decode(ex["input_ids"]).endswith("See you</s>\n")
    spans, current = [], []
    for token, label in zip(ex["input_ids"], ex["labels"]):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans + ([tok.decode(current)] if current else []) == ["Hello</s>", "See you</s>"]


def copy_with_template(tok, template: str):
    import copy

    out = copy.deepcopy(tok)
    out.chat_template = template
    return out


def test_json_array_file(tok, tmp_path):
    # The original Alpaca release is one JSON array (alpaca_data.json), not JSONL.
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}], indent=2))
    assert trained_text(tok, build_dataset(path, tok)[0]) == "hi</s>"


# ---- batching ------------------------------------------------------------------------------------

def test_collate_right_pads():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def toy(n: int):
    return [{"input_ids": [i + 3], "labels": [i + 3]} for i in range(n)]


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = BatchIterator(toy(50), 4, seed=7, pad_token_id=0), BatchIterator(toy(50), 4, seed=7, pad_token_id=0)
    forward = [a.indices(s) for s in range(40)]
    assert [b.indices(s) for s in reversed(range(40))] == forward[::-1]  # any order, e.g. after resume
    assert torch.equal(a.batch(13)["input_ids"], b.batch(13)["input_ids"])
    assert BatchIterator(toy(50), 4, seed=8, pad_token_id=0).indices(0) != forward[0]


def test_epochs_cover_the_data_once_and_reshuffle():
    it = BatchIterator(toy(10), 3, seed=0, pad_token_id=0)
    assert it.steps_per_epoch() == 3  # the 10 % 3 = 1 leftover is skipped, a different one each epoch
    epochs = [sum((it.indices(s) for s in range(e * 3, e * 3 + 3)), []) for e in range(3)]
    for epoch in epochs:
        assert len(set(epoch)) == 9
    assert epochs[0] != epochs[1]
    assert it.epoch(5) == 1


def test_shuffle_golden_values():
    # Pins torch.randperm's stream: if a torch upgrade changes it, resumed runs would see other data.
    it = BatchIterator(toy(10), 2, seed=0, pad_token_id=0)
    assert [it.indices(s) for s in range(6)] == [[4, 1], [7, 5], [3, 9], [0, 8], [6, 2], [5, 6]]


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shards_partition_the_global_batch(world_size):
    per_rank = BatchIterator(toy(61), 4, seed=3, pad_token_id=0)
    single = BatchIterator(toy(61), 4 * world_size, seed=3, pad_token_id=0)
    for step in (0, 1, 9, 40):
        shards = [per_rank.indices(step, rank, world_size) for rank in range(world_size)]
        assert all(len(s) == 4 for s in shards)
        assert len(set(sum(shards, []))) == 4 * world_size
        assert sum(shards, []) == single.indices(step)
        assert per_rank.batch(step, 1, world_size)["input_ids"].flatten().tolist() == [i + 3 for i in shards[1]]


def test_batch_iterator_errors():
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchIterator(toy(3), 4, seed=0, pad_token_id=0)
    it = BatchIterator(toy(6), 4, seed=0, pad_token_id=0)
    with pytest.raises(ValueError, match="world_size 2 = 8"):
        it.batch(0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        it.batch(0, rank=1, world_size=1)


# ---- embedded default ----------------------------------------------------------------------------

def test_tokenizer_loads_offline_and_round_trips(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("default_tokenizer() tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    tok = default_tokenizer()
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "Sort the digits:\n  3 1 2\t-> 123, café, ÜBER!"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nhi</s><|assistant|>\n"
    assert len(tok.convert_tokens_to_ids(["<|user|>"])) == 1 and tok.convert_tokens_to_ids("<|user|>") > 2


def test_make_assets_reproduces_shipped_files(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(ASSETS_DIR / "make_assets.py"), "--out", str(tmp_path)],
                   check=True, env=env, capture_output=True, timeout=120)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(ASSETS_DIR) for p in ASSETS_DIR.rglob("*")
                     if p.is_file() and p.name != "make_assets.py" and "__pycache__" not in p.parts)
    assert made == shipped
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (ASSETS_DIR / rel).read_bytes(), f"{rel} differs: rerun make_assets.py"


def test_shipped_data_is_small():
    assert DEFAULT_DATA.stat().st_size < 300_000
    assert len(load_jsonl(DEFAULT_DATA)) == 1200
    assert 15 <= len(load_jsonl(CHAT_DATA)) <= 30 and 15 <= len(load_jsonl(TEXT_DATA)) <= 30


def test_tiny_llama_trains_on_a_collated_batch(tok):
    from transformers import LlamaForCausalLM
    config = PRESETS["tiny-llama"](tok)
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (len(tok), 128, 344)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (8, 4, 2)
    assert config.max_position_embeddings >= 512 and not config.tie_word_embeddings
    assert (config.pad_token_id, config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert tiny_llama_config(100, num_layers=2, hidden_size=64).intermediate_size == 176
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    batch = BatchIterator(build_dataset(CHAT_DATA, tok, 128), 4, seed=0, pad_token_id=tok.pad_token_id).batch(0)
    loss = model(**batch).loss
    assert 5.0 < loss.item() < 9.0  # about ln(1024) = 6.9 at initialisation
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---- Parquet, CSV and save_to_disk through Hugging Face datasets -----------------------------------

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and a private cache: the loaders must be datasets' local ones, never the hub's."""
    import datasets

    def no_network(*args, **kwargs):
        raise AssertionError("reading local data tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def alpaca_records(n=24):
    return load_jsonl(DEFAULT_DATA)[:n]


def test_parquet_and_csv_build_like_jsonl(tok, tmp_path, offline):
    import datasets

    records = alpaca_records()
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    jsonl = write(tmp_path / "d.jsonl", [json.dumps(r) for r in records])
    expected = build_dataset(jsonl, tok, max_length=64)
    assert len(expected) == len(records)
    assert build_dataset(tmp_path / "d.parquet", tok, max_length=64) == expected
    assert build_dataset(str(tmp_path / "d.csv"), tok, max_length=64) == expected
    assert build_dataset(table, tok, max_length=64) == expected  # a Dataset object from Python


def test_save_to_disk_folders(tok, tmp_path, offline):
    import datasets

    chat = datasets.Dataset.from_list(load_jsonl(CHAT_DATA))
    chat.save_to_disk(str(tmp_path / "chat"))
    # Chat messages survive the columnar round trip as lists of structs.
    assert build_dataset(tmp_path / "chat", tok, 128, fmt="chat") == build_dataset(CHAT_DATA, tok, 128, fmt="chat")
    alpaca = datasets.Dataset.from_list(alpaca_records())
    datasets.DatasetDict({"validation": alpaca.select(range(4)), "train": alpaca}).save_to_disk(str(tmp_path / "dd"))
    assert len(build_dataset(tmp_path / "dd", tok, 64)) == len(alpaca)  # the train split
    datasets.DatasetDict({"a": alpaca, "b": alpaca}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(ValueError, match=r"splits \['a', 'b'\] and none is 'train'"):
        build_dataset(tmp_path / "ab", tok, 64)


def test_mixed_shapes_in_one_table_detect_per_row(tok, tmp_path, offline):
    import datasets

    # Columnar rows carry every column (None where absent); a text row must not detect as alpaca.
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi", "text": None},
            {"instruction": None, "input": None, "output": None, "text": "Plain text."}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "mixed.parquet"))
    built = build_dataset(tmp_path / "mixed.parquet", tok, 64)
    assert [trained_text(tok, e) for e in built] == ["hi</s>", "<s>Plain text.</s>"]


def test_columnar_errors_name_the_file_and_row(tok, tmp_path, offline):
    (tmp_path / "odd.csv").write_text("prompt,completion\na,b\nc,d\n")
    with pytest.raises(ValueError, match=r"odd\.csv: row 0: .*no known format.*alpaca.*chat.*text"):
        build_dataset(tmp_path / "odd.csv", tok)
    (tmp_path / "broken.csv").write_text('instruction,output\n"unterminated,x\n')
    with pytest.raises(ValueError, match=r"broken\.csv: cannot read it as CSV \(ParserError"):
        build_dataset(tmp_path / "broken.csv", tok)
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake\.parquet: cannot read it as Parquet"):
        build_dataset(tmp_path / "fake.parquet", tok)
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ValueError, match="is a directory but not one written by datasets' save_to_disk"):
        build_dataset(tmp_path / "plain_dir", tok)
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet.*\.parquet or \.csv file"):
        build_dataset(tmp_path / "nope.parquet", tok)


def test_lisa_train_on_parquet_and_save_to_disk(tmp_path, offline):
    import datasets

    from lisa_dist.recipe.train import main

    table = datasets.Dataset.from_list(alpaca_records(32))
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    logs = []
    for source in ("d.parquet", "saved"):
        out = tmp_path / f"run-{source}"
        argv = ["--data", str(tmp_path / source), "--steps", "3", "--batch-size", "4", "--max-length", "64",
                "--no-save", "--no-plots", "--output-dir", str(out)]
        assert main(argv) == 0
        logs.append(json.loads((out / "lisa_log.json").read_text()))
    # Same rows, same order: the same batches, so the same losses bit for bit.
    assert logs[0]["losses"] == logs[1]["losses"] and len(logs[0]["losses"]) == 3
