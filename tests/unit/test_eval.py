"""`lisa-train --eval-data` in one process: the held-out loss agrees with an independent computation
on the exported weights, is reported in the progress output, lisa_log.json and TensorBoard, follows
--eval-steps across a resume, and bad input exits 2. The 2-rank ZeRO-2/ZeRO-3/FSDP2 runs are the
golden-loss launches (tests/distributed/test_golden_losses.py); the ranks' sharding is checked here."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from eval_reference import reference_eval_loss, split_jsonl
from lisa_dist.recipe import data, presets
from lisa_dist.recipe.train import main

STEPS, EVERY, HELD_OUT, MAX_LENGTH = 7, 3, 23, 64
ARGS = ["--steps", str(STEPS), "--interval-steps", "2", "--batch-size", "4", "--max-length", str(MAX_LENGTH),
        "--log-every", "100", "--no-plots", "--eval-batch-size", "4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    train, held_out = root / "train.jsonl", root / "held_out.jsonl"
    split_jsonl(presets.DEFAULT_DATA, train, held_out, HELD_OUT)
    return train, held_out


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):
    train, held_out = files
    out = tmp_path_factory.mktemp("eval_run") / "run"
    proc = subprocess.run([sys.executable, "-m", "lisa_dist.train", *ARGS, "--data", str(train),
                           "--eval-data", str(held_out), "--eval-steps", str(EVERY), "--output-dir", str(out),
                           "--report-to", "tensorboard"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "lisa_log.json").read_text()), proc.stdout


def test_eval_loss_matches_an_independent_computation(run, files):
    out, log, _ = run
    want, tokens = reference_eval_loss(out, files[1], MAX_LENGTH)
    assert [e["step"] for e in log["evals"]] == [3, 6, 7]
    assert log["eval_loss"] == log["evals"][-1]["eval_loss"]
    assert all(e["eval_tokens"] == tokens for e in log["evals"])
    # fp32, batches of 4 with padding vs one example at a time: float rounding only.
    assert log["eval_loss"] == pytest.approx(want, rel=1e-5, abs=0), (log["eval_loss"], want)
    assert log["evals"][0]["eval_loss"] != log["evals"][-1]["eval_loss"]  # the model changed in between


def test_eval_lines_and_summary(run):
    _, log, stdout = run
    lines = re.findall(r"^eval step (\d+)/7: eval_loss ([\d.]+) \((\d+) tokens\)$", stdout, re.M)
    assert [(int(s), float(v), int(n)) for s, v, n in lines] == [
        (e["step"], round(e["eval_loss"], 4), e["eval_tokens"]) for e in log["evals"]]
    assert (f"eval loss ({log['evals'][-1]['eval_tokens']} held-out tokens): "
            + ", ".join(f"step {e['step']}: {e['eval_loss']:.4f}" for e in log["evals"])) in stdout


def read_eval_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("eval/loss")]


def test_tensorboard_eval_loss(run):
    out, log, _ = run
    assert read_eval_scalars(out / "tensorboard") == [(e["step"], float(np.float32(e["eval_loss"])))
                                                      for e in log["evals"]]


def test_resume_continues_the_eval_schedule(files, tmp_path):
    """The first run evaluates at 3 and at its last step 4; resumed from step 4 to 7, the second run
    evaluates at 6 and 7, not at 4 again: TensorBoard holds each step once."""
    train, held_out = files
    base = ARGS + ["--data", str(train), "--eval-data", str(held_out), "--eval-steps", str(EVERY), "--no-save",
                   "--output-dir", str(tmp_path), "--report-to", "tensorboard"]
    assert main(base + ["--steps", "4", "--save-steps", "2"]) == 0
    first = json.loads((tmp_path / "lisa_log.json").read_text())["evals"]
    assert main(base + ["--resume", str(tmp_path / "checkpoints" / "step-00000004")]) == 0
    second = json.loads((tmp_path / "lisa_log.json").read_text())["evals"]
    assert [e["step"] for e in first] == [3, 4] and [e["step"] for e in second] == [6, 7]
    assert [s for s, _ in read_eval_scalars(tmp_path / "tensorboard")] == [3, 4, 6, 7]


def test_default_is_one_evaluation_at_the_end(files, tmp_path):
    train, held_out = files
    summary_args = ARGS + ["--steps", "2", "--data", str(train), "--eval-data", str(held_out), "--no-save",
                           "--output-dir", str(tmp_path)]
    assert main(summary_args) == 0
    log = json.loads((tmp_path / "lisa_log.json").read_text())
    assert [e["step"] for e in log["evals"]] == [2]


@pytest.mark.parametrize("n, world, batch", [(23, 2, 4), (17, 2, 4), (5, 4, 2), (3, 4, 1), (8, 1, 3)])
def test_ranks_share_every_example_once(n, world, batch):
    """Disjoint shares, none dropped, the same number of batches on every rank (collective forwards),
    fillers carry no label."""
    dataset = [{"input_ids": [1, 100 + i, 7], "labels": [-100, 100 + i, 7]} for i in range(n)]
    per_rank = [data.eval_batches(dataset, batch, 0, rank, world) for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    seen = [int(ids[1]) - 100 for batches in per_rank for b in batches
            for ids, labels in zip(b["input_ids"], b["labels"]) if (labels != -100).any()]
    assert sorted(seen) == list(range(n))
    assert all(len(b["input_ids"]) <= batch for batches in per_rank for b in batches)


def _error(argv, capsys):
    try:
        code = main(ARGS + ["--steps", "1", "--no-save"] + argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, capsys.readouterr().err


def test_bad_eval_input_exits_2(files, tmp_path, capsys):
    train, held_out = files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "plain text to model"}\n')
    cases = [
        (["--eval-data", "/nonexistent/held_out.jsonl"], ["--eval-data: data file '/nonexistent/held_out.jsonl'"]),
        (["--eval-data", str(empty)], [f"--eval-data {empty}", "no examples"]),
        (["--eval-data", str(held_out), "--eval-steps", "-1"], ["--eval-steps must be >= 0"]),
        (["--eval-steps", "5"], ["--eval-steps needs --eval-data"]),
        (["--eval-data", str(held_out), "--eval-batch-size", "0"], ["--eval-batch-size must be >= 1"]),
        # auto: the held-out records have another shape than the training data's
        (["--data", str(train), "--eval-data", str(text)], ["holds text records", "holds only alpaca",
                                                             "masked differently"]),
        # a named format the held-out records do not have
        (["--data", str(train), "--data-format", "alpaca", "--eval-data", str(text)],
         [f"--eval-data {text}: {text}: line 1", "'text' shape but fmt='alpaca'"]),
    ]
    for argv, messages in cases:
        code, err = _error(argv + ["--output-dir", str(tmp_path / "run")], capsys)
        assert code == 2, (argv, err)
        assert "Traceback" not in err
        for message in messages:
            assert message in err, (argv, err)


def test_runner_evaluates_in_eval_mode_without_gradients():
    """With attention dropout, a training-mode forward would differ each call: the runner's loss is the
    eval-mode one, builds no gradient, and leaves the model training."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lisa_dist import LisaConfig
    from lisa_dist.backends.single import SingleRunner

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5))
    runner = SingleRunner(model, LisaConfig(activated_layers=1, interval_steps=1), lr=1e-3)
    ids = torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]
    total, count = runner.evaluate(batches)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, labels=labels).loss.item()
    assert count == 3 * 6 and total / count == pytest.approx(want, rel=1e-6)
