"""Gradient communication per optimizer step (benchmarks/grad_traffic.py) on 2 CPU ranks, one
`deepspeed --num_gpus 2` launch for ZeRO-1/2/3 and FSDP2 (FSDP2 runs in the same gloo process
group): every collective is counted at the ProcessGroup methods (benchmarks/collective_count.py).

Goal (issue 18): lisa_dist's gradient bytes <= 1.05 x full fine-tuning's x Psi_a / Psi; and frozen
layers issue no gradient collective, i.e. the bytes reduced are exactly the trainable gradients.
"""
from __future__ import annotations

import json

import pytest

from launch_util import ROOT, deepspeed_launch, output_tail

SCRIPT = ROOT / "benchmarks" / "grad_traffic.py"
MODEL = ["--hidden", "64", "--intermediate", "128", "--layers", "6", "--heads", "4", "--kv-heads", "2",
         "--vocab", "256", "--seq", "16", "--batch", "1", "--gamma", "2", "--warmup", "1"]

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("grad_traffic")
    proc = deepspeed_launch(SCRIPT, [*MODEL, "--out", str(out)], nproc=2)
    assert proc.returncode == 0, f"grad_traffic launch failed (rc {proc.returncode}):\n{output_tail(proc)}"
    assert (out / "grad_traffic.md").is_file()
    return json.loads((out / "grad_traffic.json").read_text())


def _rows(report, engine):
    rows = {r["row"]: r for r in report["rows"] if r["engine"] == engine}
    assert set(rows) == {"full", "lisa"}, rows
    return rows["full"], rows["lisa"]


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3", "fsdp2"])
def test_lisa_gradient_bytes_within_goal(report, engine):
    full, lisa = _rows(report, engine)
    assert 0 < lisa["psi_active"] < lisa["psi"] == full["psi"]
    assert lisa["grad_bytes"] > 0 and full["grad_bytes"] > 0
    assert lisa["grad_dtype"] == full["grad_dtype"]
    assert lisa["grad_bytes"] <= 1.05 * full["grad_bytes"] * lisa["psi_active"] / lisa["psi"], lisa
    assert lisa["meets_goal"]


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3", "fsdp2"])
def test_only_trainable_gradients_are_reduced(report, engine):
    """Every reduced byte is a trainable gradient (ZeRO-3/FSDP2 may pad each tensor to a multiple of
    the world size): a frozen layer of this model is ~15% of Psi, so one sending anything would
    show."""
    for r in _rows(report, engine):
        assert r["trainable_grad_bytes"] <= r["grad_bytes"] <= 1.01 * r["trainable_grad_bytes"], r
    full, lisa = _rows(report, engine)
    assert lisa["trainable_grad_bytes"] < 0.7 * full["trainable_grad_bytes"]


def test_fsdp2_frozen_units_issue_no_reduce_scatter(report):
    full, lisa = _rows(report, "fsdp2")
    layers, gamma = report["config"]["layers"], report["config"]["gamma"]
    assert full["reduce_scatter_calls"] == layers + 1  # one unit per layer + the root unit
    assert lisa["reduce_scatter_calls"] == gamma + 1


def test_counts_are_the_same_on_every_rank_and_no_shm_path(report):
    by_rank = report["rows_by_rank"]
    assert len(by_rank) == 2
    for a, b in zip(*by_rank):
        assert (a["engine"], a["row"], a["grad_bytes"]) == (b["engine"], b["row"], b["grad_bytes"])
    for r in report["rows"]:
        assert not any("shm_all_reduce" in ops for ops in r["comm"].values()), r["comm"]
