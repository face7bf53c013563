"""Backend-neutral checkpoint plumbing for `lisa-train`: atomic directories, the `latest` pointer,
keep-last-N, `--resume auto` discovery and weights-only loading.

Layout under `<output-dir>/checkpoints/`:

    step-00000010/      one complete checkpoint (the runner's files + lisa_train_state.json)
    step-00000020/
    latest              text file naming the newest complete checkpoint ("step-00000020")
    .tmp-step-00000030/ a save in progress (or one a crash interrupted); never named by `latest`

A save goes to `.tmp-step-N`; after every rank has written its part (barrier), rank 0 writes the
marker file, renames the directory to `step-N` and swaps `latest` with os.replace, so a kill at any
moment leaves the previous checkpoint complete and named. Ranks must share the filesystem.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, List, Optional

from lisa_dist.protocol import Runner
from lisa_dist.recipe.run_config import RunConfig
from lisa_dist.serialization import write_text_atomic

LATEST = "latest"
MARKER = "lisa_train_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FORMAT = 1


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def read_marker(directory: Path) -> dict:
    return json.loads((directory / MARKER).read_text(encoding="utf-8"))


def complete_checkpoints(root: Path) -> List[Path]:
    """Complete `step-N` directories under root, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and is_complete(d)]
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint `latest` names, or, if the pointer is missing or stale (e.g. deleted by hand),
    the newest complete one. None when there is none."""
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(named):
            return named
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, output_dir: Path) -> Optional[Path]:
    """`--resume auto`: the latest complete checkpoint in <output-dir>/checkpoints, or None for a
    fresh start. `--resume PATH`: a checkpoint directory, or a checkpoints root holding `latest`."""
    if resume == "auto":
        return latest_checkpoint(output_dir / "checkpoints")
    path = Path(resume)
    if is_complete(path):
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"--resume {resume}: not a complete lisa-train checkpoint (no {MARKER}) nor a directory holding "
            f"one; pass a step-N directory from <output-dir>/checkpoints, or --resume auto")
    return found


def save(root: Path, step: int, write: Callable[[Path], None], *, rank: int, barrier: Callable[[], None],
         keep_last: int = 0, meta: Optional[dict] = None) -> Path:
    """Write one checkpoint atomically. `write(tmp_dir)` is called on every rank and writes that
    rank's part; rank 0 commits once all ranks are done. Returns the final directory."""
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        # A leftover of a save that was killed would mix old and new files.
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write(tmp)
    barrier()
    if rank == 0:
        marker = {"format": _FORMAT, "step": step, **(meta or {})}
        write_text_atomic(tmp / MARKER, json.dumps(marker, indent=1))
        if final.exists():  # the same step saved again (a resumed run re-reaching it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST, final.name)
        if keep_last > 0:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


# --- lisa-train glue ------------------------------------------------------------------------------

def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def resume_for_train(runner: Runner, run: RunConfig) -> int:
    """`--resume`: restore the runner from the chosen checkpoint and return the step to continue
    from (0 when `auto` finds none)."""
    if not run.resume:
        return 0
    found = resolve_resume(run.resume, Path(run.output_dir))
    if found is None:
        if runner.rank == 0:
            print(f"lisa-train: --resume auto: no complete checkpoint in {Path(run.output_dir) / 'checkpoints'}, "
                  "starting from step 0", flush=True)
        return 0
    marker = read_marker(found)
    if marker.get("backend") != run.backend or marker.get("world_size") != runner.world_size:
        raise ValueError(f"--resume {found}: written by --backend {marker.get('backend')} on "
                         f"{marker.get('world_size')} rank(s), this run is --backend {run.backend} on "
                         f"{runner.world_size}; resume with the backend and number of ranks that wrote it")
    step = runner.load_checkpoint(found)
    assert step == marker["step"], f"{found}: runner restored step {step}, marker says {marker['step']}"
    if runner.rank == 0:
        print(f"lisa-train: resumed from {found} at step {step}", flush=True)
    return step


def save_for_train(runner: Runner, run: RunConfig, step: int, tokenizer) -> Optional[Path]:
    """`--save-steps`: an atomic checkpoint every N optimizer steps (and at the last one)."""
    if not run.save_steps or (step % run.save_steps and step != run.steps):
        return None

    def write(tmp: Path) -> None:
        runner.save_checkpoint(tmp, step)
        if runner.rank == 0 and tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")

    return save(Path(run.output_dir) / "checkpoints", step, write, rank=runner.rank, barrier=_barrier,
                keep_last=run.keep_last,
                meta={"backend": run.backend, "world_size": runner.world_size, "model": run.model,
                      "lisa": run.lisa.to_dict(), "active_layers": list(runner.active_layers),
                      "switch_index": runner.switch_index})
