"""`lisa-train --report-to tensorboard`: the run's per-step and per-switch figures as TensorBoard scalars.

Rank 0 writes OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR/tensorboard`). Scalars are
logged at the global step, the number of optimizer steps done (the loss of the first step is at 1):

- every step: train/loss, train/learning_rate (the rate that step used), train/tokens_per_second_per_rank
  (cumulative, as the log line prints it) and lisa/switch_index (the interval the step trained in);
- at every switch, at the step it took effect: switch/seconds, switch/optimizer_bytes (this rank's
  fp32 master + moments right after the switch), switch/optimizer_bytes_after_first_step (once the
  new set has stepped and its moments exist), switch/host_bytes and switch/device_<kind>_bytes where
  the backend records them (DeepSpeed), and the active set as text under lisa/active_layers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

REPORT_TO = ("none", "tensorboard")
LOG_SUBDIR = "tensorboard"


class Reporter:
    """Does nothing, unless rank 0 was asked for TensorBoard."""

    def __init__(self, report_to: str, out_dir: Path, is_main: bool):
        if report_to not in REPORT_TO:
            raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
        self._writer = None
        self._switches_written = 0
        self._after_first_written: set = set()
        if report_to == "tensorboard" and is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--report-to tensorboard needs the tensorboard package: "
                                 "pip install tensorboard") from None
            self._writer = SummaryWriter(log_dir=str(Path(out_dir) / LOG_SUBDIR))

    @property
    def log_dir(self):
        return self._writer.log_dir if self._writer else None

    def skip_switches_before(self, schedule: List[Dict[str, Any]], step: int) -> None:
        """On resume from `step`, the first run reported the switches up to and including the one at
        `step` (it switches at the end of its last step), but not that set's first-step bytes."""
        if step == 0:
            return
        self._switches_written = sum(1 for e in schedule if e["step"] <= step)
        self._after_first_written = {i for i, e in enumerate(schedule) if e["step"] < step}

    def step(self, global_step: int, loss: float, learning_rate: float, tokens_per_second: float,
             switch_index: int, schedule: List[Dict[str, Any]]) -> None:
        if self._writer is None:
            return
        w = self._writer
        w.add_scalar("train/loss", loss, global_step)
        w.add_scalar("train/learning_rate", learning_rate, global_step)
        w.add_scalar("train/tokens_per_second_per_rank", tokens_per_second, global_step)
        w.add_scalar("lisa/switch_index", switch_index, global_step)
        self._switches(schedule)

    def _switches(self, schedule: Sequence[Dict[str, Any]]) -> None:
        w = self._writer
        for i in range(self._switches_written, len(schedule)):
            entry, at = schedule[i], schedule[i]["step"]
            w.add_text("lisa/active_layers", str(list(entry["active_layers"])), at)
            w.add_scalar("switch/seconds", entry["seconds"], at)
            w.add_scalar("switch/optimizer_bytes", entry["optimizer_bytes"], at)
            if "host_bytes" in entry:
                w.add_scalar("switch/host_bytes", entry["host_bytes"], at)
            for kind, value in (entry.get("device_memory") or {}).items():
                w.add_scalar(f"switch/device_{kind}_bytes", value, at)
        self._switches_written = len(schedule)
        # Recorded a step after the switch, so it appears in an entry already written.
        for i, entry in enumerate(schedule):
            if i not in self._after_first_written and "optimizer_bytes_after_first_step" in entry:
                w.add_scalar("switch/optimizer_bytes_after_first_step", entry["optimizer_bytes_after_first_step"],
                             entry["step"])
                self._after_first_written.add(i)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
