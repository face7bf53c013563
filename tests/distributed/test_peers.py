"""benchmarks/peers.py --smoke for real: the single-process engine in the parent process and ZeRO-2 on
2 ranks (gloo) through the deepspeed launcher, in one command; the tests read what it wrote."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch_util import ROOT, launch_env

METHODS = ("full", "lora_r8", "lora_r64", "naive", "lisa", "lisa_no_emb")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--smoke", "--engines", "single,zero2",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    for suffix in ("json", "md", "png"):
        assert (out / f"peers.{suffix}").stat().st_size > 0
    result = json.loads((out / "peers.json").read_text())
    result["markdown"] = (out / "peers.md").read_text()
    return result


def _row(report, engine, method):
    [row] = [r for r in report["rows"] if r["engine"] == engine and r["method"] == method]
    return row


def _optimizer_bytes(row) -> int:
    return row["model_state_bytes"]["optimizer_state"] + row["model_state_bytes"]["master"]


def test_every_engine_and_method_is_measured(report):
    assert [(r["engine"], r["method"]) for r in report["rows"]] == \
        [(e, m) for e in ("single", "zero2") for m in METHODS]
    for r in report["rows"]:
        assert len(r["ranks"]) == r["world_size"] == (1 if r["engine"] == "single" else 2)
        assert r["model_state_bytes"]["weights"] > 0 and r["model_state_bytes"]["optimizer_state"] > 0
        assert r["peak_rss_bytes"] >= r["peak_rss_over_start_bytes"] > 0
        assert len(r["step_seconds"]) == report["config"]["steps"] and r["median_step_seconds"] > 0
        assert r["tokens_per_second"] == pytest.approx(
            r["world_size"] * report["config"]["batch"] * report["config"]["seq"] / r["median_step_seconds"])


def test_results_record_machine_versions_config_and_command(report):
    assert report["command"].startswith("python benchmarks/peers.py --smoke")
    assert report["machine"]["cpu"] and report["machine"]["cpus_visible"] >= 1
    for package in ("torch", "deepspeed", "transformers", "peft"):
        assert report["versions"][package]
    assert report["config"]["smoke"] and report["backend"] == "gloo"
    assert report["command"] in report["markdown"] and "peft" in report["markdown"]


def test_single_process_lora_r8_below_lisa_below_full(report):
    total = {m: _row(report, "single", m)["model_state_bytes"]["total"] for m in METHODS}
    assert total["lora_r8"] < total["lisa"] < total["full"]
    assert total["lisa_no_emb"] < total["lisa"]
    # fp32 AdamW: two moments per trained parameter, the weights are their own masters.
    full = _row(report, "single", "full")
    assert full["model_state_bytes"]["master"] == 0
    assert full["model_state_bytes"]["optimizer_state"] >= 8 * full["trainable_params"]


def test_naive_toggling_under_zero_keeps_full_optimizer_state(report):
    full, naive, lisa = (_row(report, "zero2", m) for m in ("full", "naive", "lisa"))
    assert _optimizer_bytes(naive) == _optimizer_bytes(full)
    assert _optimizer_bytes(lisa) < _optimizer_bytes(full)
    assert lisa["model_state_bytes"]["total"] < full["model_state_bytes"]["total"]


def test_compute_floor_beside_every_row(report):
    single_full = _row(report, "single", "full")
    assert "compute_floor_seconds" not in single_full  # it is the basis
    for r in report["rows"]:
        if r is single_full:
            continue
        assert (r["compute_fraction"] == 1.0) == (r["method"] == "full")
        assert 1 / 3 < r["compute_fraction"] <= 1
        assert r["compute_floor_seconds"] == pytest.approx(r["compute_fraction"] * single_full["median_step_seconds"])
    # Frozen embeddings stop the backward at the lowest active layer: never dearer than the default.
    fraction = {m: _row(report, "single", m)["compute_fraction"] for m in ("lisa", "lisa_no_emb")}
    assert fraction["lisa_no_emb"] <= fraction["lisa"]
    assert _row(report, "single", "lora_r8")["compute_fraction"] == pytest.approx(2 / 3)
