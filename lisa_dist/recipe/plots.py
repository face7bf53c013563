"""The PNGs `lisa-train` leaves in its output directory: the layer schedule and memory over the run.

Drawn from lisa_log.json's figures (the schedule entries), with matplotlib's Agg canvas directly, so
a caller's pyplot backend is never switched. The data of each plot comes from a function of its own
(`schedule_grid`, `memory_series`) that the tests check against the sampler and the log.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

SCHEDULE_PNG = "lisa_schedule.png"
MEMORY_PNG = "lisa_memory.png"

Schedule = Sequence[Dict[str, Any]]


def schedule_grid(schedule: Schedule, num_layers: int, steps: int, first_step: int = 0) -> List[List[int]]:
    """grid[layer][step] = 1 where the layer trained at optimizer step `step` (0-based), from the
    schedule log: each entry's set holds from its step until the next entry's. Steps before
    `first_step` (a resumed run trained them in an earlier process) stay 0."""
    grid = [[0] * steps for _ in range(num_layers)]
    for entry, nxt in zip(schedule, list(schedule[1:]) + [None]):
        end = min(steps, nxt["step"] if nxt else steps)
        for layer in entry["active_layers"]:
            if not 0 <= layer < num_layers:
                raise ValueError(f"schedule entry at step {entry['step']} names layer {layer}, "
                                 f"outside 0..{num_layers - 1}")
            for s in range(max(first_step, entry["step"]), end):
                grid[layer][s] = 1
    return grid


def memory_series(schedule: Schedule) -> Dict[str, List[Tuple[int, int]]]:
    """(step, bytes) points per recorded quantity: this rank's optimizer state right after each
    switch and after the new set's first step (when its moments exist), and, where the backend
    records them, host-offloaded state and device memory at each switch."""
    series: Dict[str, List[Tuple[int, int]]] = {"optimizer state (fp32 master + moments)": []}
    for entry in schedule:
        points = series["optimizer state (fp32 master + moments)"]
        points.append((entry["step"], entry["optimizer_bytes"]))
        if "optimizer_bytes_after_first_step" in entry:
            points.append((entry["step"] + 1, entry["optimizer_bytes_after_first_step"]))
        if "host_bytes" in entry:
            series.setdefault("offloaded to host", []).append((entry["step"], entry["host_bytes"]))
        for kind in ("allocated", "reserved"):
            if kind in (entry.get("device_memory") or {}):
                series.setdefault(f"device {kind}", []).append((entry["step"], entry["device_memory"][kind]))
    return series


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def write_plots(out_dir: Path, schedule: Schedule, num_layers: int, steps: int, first_step: int = 0) -> List[Path]:
    """Both PNGs into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    grid = schedule_grid(schedule, num_layers, steps, first_step)
    fig = _figure(min(16, 4 + steps / 20), min(12, 1.5 + num_layers / 4))
    ax = fig.add_subplot()
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="Greys", origin="lower",
              extent=(0, steps, -0.5, num_layers - 0.5), vmin=0, vmax=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("decoder layer")
    ax.set_title("LISA schedule: trained layers (black) per step")
    fig.tight_layout()
    fig.savefig(out_dir / SCHEDULE_PNG)

    fig = _figure(8, 4)
    ax = fig.add_subplot()
    for label, points in memory_series(schedule).items():
        xs, ys = zip(*sorted(points))
        ax.step(xs, [y / 2**20 for y in ys], where="post", marker="o", markersize=3, label=label)
    ax.set_xlim(0, steps)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MiB (rank 0)")
    ax.set_title("Memory over the run: at each switch and after the new set's first step")
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(out_dir / MEMORY_PNG)
    return [out_dir / SCHEDULE_PNG, out_dir / MEMORY_PNG]
