"""What `lisa-train` leaves besides the weights: TensorBoard events (--report-to) and the PNG plots."""
import json
import subprocess
import sys

import numpy as np
import pytest

from lisa_dist.config import LisaConfig
from lisa_dist.recipe.plots import MEMORY_PNG, SCHEDULE_PNG, memory_series, schedule_grid
from lisa_dist.recipe.train import main
from lisa_dist.sampling import LayerSampler

STEPS, K, LR, WARMUP = 7, 2, 1e-3, 4
ARGS = ["--steps", str(STEPS), "--interval-steps", str(K), "--batch-size", "4", "--max-length", "64",
        "--lr", str(LR), "--warmup-steps", str(WARMUP), "--no-save", "--log-every", "100"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("lisa/active_layers/text_summary")]
    return scalars, texts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    assert main(ARGS + ["--output-dir", str(out), "--report-to", "tensorboard"]) == 0
    return out, json.loads((out / "lisa_log.json").read_text())


def f32(values):
    # TensorBoard stores scalars as float32.
    return [float(np.float32(v)) for v in values]


def test_tensorboard_scalars_match_the_run(run):
    out, log = run
    event_files = list(out.rglob("events.out.tfevents.*"))
    assert len(event_files) == 1 and event_files[0].parent == out / "tensorboard"
    scalars, texts = read_events(out / "tensorboard")
    steps = list(range(1, STEPS + 1))
    assert scalars["train/loss"] == list(zip(steps, f32(log["losses"])))
    # The step's own rate: linear warm-up from LR/WARMUP, then LR.
    assert scalars["train/learning_rate"] == list(zip(steps, f32(LR * min(1.0, s / WARMUP) for s in steps)))
    assert [s for s, _ in scalars["train/tokens_per_second_per_rank"]] == steps
    assert all(v > 0 for _, v in scalars["train/tokens_per_second_per_rank"])
    assert scalars["lisa/switch_index"] == [(s, (s - 1) // K) for s in steps]
    schedule = log["schedule"]
    assert scalars["switch/optimizer_bytes"] == [(e["step"], float(e["optimizer_bytes"])) for e in schedule]
    assert scalars["switch/seconds"] == [(e["step"], v) for e, v in zip(schedule, f32(e["seconds"] for e in schedule))]
    assert scalars["switch/optimizer_bytes_after_first_step"] == [
        (e["step"], float(e["optimizer_bytes_after_first_step"])) for e in schedule
        if "optimizer_bytes_after_first_step" in e]
    assert len(scalars["switch/optimizer_bytes_after_first_step"]) == len(schedule)  # 7 steps: the last set stepped
    assert texts == [(e["step"], str(e["active_layers"])) for e in schedule]


def test_no_events_without_report_to(tmp_path):
    assert main(ARGS + ["--steps", "2", "--output-dir", str(tmp_path), "--no-plots"]) == 0
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert not (tmp_path / SCHEDULE_PNG).exists() and not (tmp_path / MEMORY_PNG).exists()


def test_plots_are_pngs(run):
    from matplotlib.image import imread

    out, _ = run
    for name in (SCHEDULE_PNG, MEMORY_PNG):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # something was drawn


def test_schedule_plot_data_is_the_samplers_schedule(run):
    _, log = run
    assert log["num_layers"] == 8
    sampler = LayerSampler(8, LisaConfig(activated_layers=2, interval_steps=K, seed=0))
    expected = [[int(layer in sampler.active_layers(s // K)) for s in range(STEPS)] for layer in range(8)]
    assert schedule_grid(log["schedule"], log["num_layers"], STEPS) == expected
    # A resumed run's earlier steps were trained (and plotted) by the first process.
    resumed = schedule_grid(log["schedule"], 8, STEPS, first_step=3)
    assert all(row[:3] == [0, 0, 0] and row[3:] == full[3:] for row, full in zip(resumed, expected))
    with pytest.raises(ValueError, match="layer 9"):
        schedule_grid([{"step": 0, "active_layers": [9]}], 8, 2)


def test_memory_plot_data_is_the_logged_memory(run):
    _, log = run
    (label, points), = memory_series(log["schedule"]).items()
    assert "optimizer state" in label
    expected = []
    for e in log["schedule"]:
        expected.append((e["step"], e["optimizer_bytes"]))
        expected.append((e["step"] + 1, e["optimizer_bytes_after_first_step"]))
    assert points == expected
    offload = memory_series([{"step": 0, "optimizer_bytes": 5, "host_bytes": 7,
                              "device_memory": {"allocated": 3, "reserved": 4, "peak_allocated": 9}}])
    assert offload["offloaded to host"] == [(0, 7)] and offload["device allocated"] == [(0, 3)]
    assert offload["device reserved"] == [(0, 4)]


@pytest.mark.parametrize("argv, message", [
    (["--report-to", "wandb"], "invalid choice: 'wandb'"),
    (["--config", "CFG"], "--report-to must be one of none, tensorboard, got 'wandb'"),
])
def test_bad_report_to_exits_2(argv, message, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("report_to: wandb\n")
    argv = [str(cfg) if a == "CFG" else a for a in argv]
    proc = subprocess.run([sys.executable, "-m", "lisa_dist.train", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_resumed_run_continues_the_event_stream(tmp_path):
    """The resumed process appends its own event file; together they hold each step and switch once."""
    base = ARGS + ["--output-dir", str(tmp_path), "--report-to", "tensorboard", "--no-plots"]
    assert main(base + ["--steps", "4", "--save-steps", "2"]) == 0
    first = json.loads((tmp_path / "lisa_log.json").read_text())["losses"]
    assert main(base + ["--resume", str(tmp_path / "checkpoints" / "step-00000004")]) == 0
    log = json.loads((tmp_path / "lisa_log.json").read_text())
    scalars, _ = read_events(tmp_path / "tensorboard")
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert scalars["train/loss"] == list(zip(range(1, STEPS + 1), f32(first + log["losses"])))
    switch_steps = list(range(0, STEPS, K))
    assert [s for s, _ in scalars["switch/optimizer_bytes"]] == switch_steps
    assert [s for s, _ in scalars["switch/optimizer_bytes_after_first_step"]] == switch_steps
