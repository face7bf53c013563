"""`lisa-train` end to end on the embedded default and on a local save_pretrained directory, and its errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from lisa_dist.recipe import presets
from lisa_dist.recipe.train import main

FAST = ["--steps", "6", "--interval-steps", "2", "--batch-size", "4", "--max-length", "64", "--log-every", "2"]


def test_embedded_default_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(FAST + ["--output-dir", str(out), "--steps", "8"]) == 0
    log = json.loads((out / "lisa_log.json").read_text())
    assert [e["step"] for e in log["schedule"]] == [0, 2, 4, 6, 8]
    assert all(len(e["active_layers"]) == 2 for e in log["schedule"])
    assert log["optimizer_bytes_per_rank"] < log["full_finetune_optimizer_bytes_per_rank"]
    # Every interval's set stepped (K=2): its moments exist, so it holds more than at the switch,
    # and the same for every interval since all layers are the same size.
    stepped = [e["optimizer_bytes_after_first_step"] for e in log["schedule"][:-1]]
    assert len(set(stepped)) == 1 and stepped[0] == log["optimizer_bytes_per_rank"]
    assert all(e["optimizer_bytes_after_first_step"] > e["optimizer_bytes"] for e in log["schedule"][1:-1])
    assert len(log["losses"]) == 8
    text = capsys.readouterr().out
    assert "switch 1 at step 2" in text and "optimizer memory per rank" in text
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model(**tok("hello", return_tensors="pt")).logits.shape[-1] == model.config.vocab_size


def test_local_model_directory_and_config_file(tmp_path):
    tok = presets.default_tokenizer()
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tmp_path / 'base'}\nactivated_layers: 1\ninterval-steps: 3\nsteps: 6\n"
                   f"state_policy: offload\ndata: {presets.CHAT_DATA}\nbatch_size: 2\n")
    out = tmp_path / "run"
    assert main(["--config", str(cfg), "--output-dir", str(out), "--interval-steps", "2"]) == 0
    log = json.loads((out / "lisa_log.json").read_text())
    assert log["lisa"]["interval_steps"] == 2 and log["lisa"]["state_policy"] == "offload"  # flag beats file
    assert [len(e["active_layers"]) for e in log["schedule"]] == [1, 1, 1, 1]
    trained = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(trained).__name__ == "Qwen2ForCausalLM"
    assert not torch.equal(trained.lm_head.weight, model.lm_head.weight)


def _error(argv, capsys):
    try:
        code = main(FAST + ["--no-save"] + argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--activated-layers", "0"], "--activated-layers (gamma) must be >= 1"),
    (["--activated-layers", "9"], "only 8 decoder layers"),
    (["--interval-steps", "0"], "--interval-steps (K) must be >= 1"),
    (["--layers-path", "model.blocks"], "layers_path"),
    (["--data", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    (["--backend", "deepspeed"], "--deepspeed CONFIG.json"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    code, err = _error(argv, capsys)
    assert code != 0
    assert message in err


def test_malformed_and_empty_data(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    code, err = _error(["--data", str(bad)], capsys)
    assert code != 0 and "line 2" in err and "bad.jsonl" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, err = _error(["--data", str(empty)], capsys)
    assert code != 0 and "no examples" in err


def test_unknown_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-model", "hidden_size": 8}))
    code, err = _error(["--model", str(tmp_path)], capsys)
    assert code != 0 and "not-a-model" in err


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lisa_dist.train", "--activated-layers", "-1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--activated-layers (gamma) must be >= 1" in proc.stderr


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A checkpoint whose embeddings hold fewer rows than the tokenizer saved beside it has tokens."""
    tok = presets.default_tokenizer()
    path = tmp_path_factory.mktemp("small_vocab") / "model"
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("argv, messages", [
    (["--model", "/nonexistent/model-dir"], ["--model /nonexistent/model-dir: no such directory", "save_pretrained"]),
    (["--model", "EMPTY_DIR"], ["holds no config.json", "pass the folder that contains config.json"]),
    (["--model", "some-org/missing-model"], ["HF_HUB_OFFLINE=1 forbids downloading"]),
    # The hub client's OSError for an id it cannot fetch (offline here; with no route to the hub
    # the same error comes after its retries).
    (["--tokenizer", "some-org/missing-tokenizer"],
     ["fetching it as a Hugging Face id failed",
      "huggingface-cli download some-org/missing-tokenizer --local-dir DIR"]),
    (["--model", "SMALL_VOCAB"], ["the data tokenizes to token id",
                                  "but the model's input embeddings have 64 rows (the tokenizer has",
                                  "resize_token_embeddings"]),
])
def test_model_and_tokenizer_errors_exit_2_without_traceback(argv, messages, tmp_path, small_vocab_model):
    path = small_vocab_model
    argv = [{"EMPTY_DIR": str(tmp_path), "SMALL_VOCAB": str(path)}.get(a, a) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "lisa_dist.train", *FAST, "--steps", "1", "--no-save", "--no-plots",
                           "--output-dir", str(tmp_path / "run"), *argv],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for message in messages:
        assert message in proc.stderr


def test_over_length_examples_get_one_line_and_can_be_dropped(tmp_path, capsys):
    # The shipped examples are 13 to 47 tokens; at 24 some prompts fill the window, others lose their ends.
    from lisa_dist.recipe.data import tokenize_dataset
    _, cut = tokenize_dataset(presets.DEFAULT_DATA, presets.default_tokenizer(), max_length=24)
    _, dropped = tokenize_dataset(presets.DEFAULT_DATA, presets.default_tokenizer(), max_length=24, overlong="drop")
    assert cut.truncated > 0 and cut.dropped > 0 and dropped.dropped == cut.over
    args = FAST + ["--steps", "1", "--no-save", "--no-plots", "--max-length", "24", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data:")]
    assert lines == [f"data: cut {cut.truncated} of 1200 examples longer than --max-length 24 tokens (the longest has "
                     f"{cut.longest}) to their first 24, so their ends (the last response tokens and EOS) are not "
                     f"trained on, and left out {cut.dropped} more whose prompt fills the window; raise --max-length, "
                     "or pass --overlong drop to leave such examples out"]
    assert main(args + ["--overlong", "drop"]) == 0
    out = capsys.readouterr().out
    assert f"data: left out {dropped.dropped} of 1200 examples longer than --max-length 24" in out
    assert f"| {1200 - dropped.dropped} examples from" in out
    assert main(FAST + ["--steps", "1", "--no-save", "--no-plots", "--output-dir", str(tmp_path)]) == 0
    assert "data:" not in capsys.readouterr().out  # nothing over the default length: no line


def test_alpaca_data_through_the_chat_template(tmp_path):
    out = tmp_path / "run"
    assert main(FAST + ["--steps", "2", "--no-save", "--no-plots", "--data-format", "chat",
                        "--output-dir", str(out)]) == 0
    assert json.loads((out / "lisa_log.json").read_text())["losses"]


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    """A checkpoint whose LM head is its input embedding (tie_word_embeddings, as SmolLM2 and Gemma 3)."""
    tok = presets.default_tokenizer()
    path = tmp_path_factory.mktemp("tied") / "model"
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("flag", ["--no-train-embeddings", "--no-train-head"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_freezing_one_side_of_a_tied_embedding_is_refused(flag, dry_run, tied_model, capsys):
    code, err = _error(["--model", str(tied_model), flag] + (["--dry-run"] if dry_run else []), capsys)
    assert code == 2
    assert "ties its input embeddings and its LM head (model.embed_tokens.weight is both)" in err
    assert f"alone ({flag})" in err and "--no-train-embeddings and --no-train-head" in err


def test_freezing_both_sides_of_a_tied_embedding_freezes_it(tied_model, tmp_path):
    out = tmp_path / "run"
    assert main(FAST + ["--model", str(tied_model), "--steps", "2", "--no-train-embeddings", "--no-train-head",
                        "--no-plots", "--output-dir", str(out)]) == 0
    before = transformers.AutoModelForCausalLM.from_pretrained(tied_model)
    after = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(after.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert after.lm_head.weight is after.model.embed_tokens.weight
    active = json.loads((out / "lisa_log.json").read_text())["schedule"][0]["active_layers"]
    for i in active:
        assert not torch.equal(after.model.layers[i].mlp.up_proj.weight, before.model.layers[i].mlp.up_proj.weight)
