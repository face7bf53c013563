"""SIGKILL a rank of a real lisa-train run at a chosen moment, from the test side.

The recovery tests need a rank to die mid-run: right after optimizer step S (`kill_at_step`), or
inside the save of step S's checkpoint after the rank wrote its part and before rank 0 commits it
(`kill_in_save_at_step`). Product code has no hook for this. `env()` gives a launch the variables
that ask for it and puts tests/support/faults/ on PYTHONPATH; Python imports the `sitecustomize`
there at start-up in every process of the launch (torchrun's restarted workers and the ranks it
starts on other hosts too), which calls `install()`. That wraps functions of
lisa_dist.recipe.checkpoints when the module is imported:

- `save_for_train(runner, run, step, ...)`, which the train loop calls after every optimizer step:
  the wrapper kills once it returned for step S;
- `save(root, step, write, ...)`: the wrapper's `write` kills after the real one wrote the rank's
  part of step S, i.e. before the barrier after which rank 0 writes the marker and renames.

Only rank `kill_rank` (RANK, 0 without a launcher) is killed, and only on the first attempt
(TORCHELASTIC_RESTART_COUNT 0 or unset), so a job torchrun restarts can finish.
"""
from __future__ import annotations

import functools
import importlib.abc
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

FAULTS_DIR = Path(__file__).resolve().parent / "faults"
KILL_AT_STEP = "LISA_FAULT_KILL_AT_STEP"
KILL_IN_SAVE_AT_STEP = "LISA_FAULT_KILL_IN_SAVE_AT_STEP"
KILL_RANK = "LISA_FAULT_KILL_RANK"
TARGET = "lisa_dist.recipe.checkpoints"


def env(kill_at_step: Optional[int] = None, kill_in_save_at_step: Optional[int] = None,
        kill_rank: int = 0) -> Dict[str, str]:
    """Variables for launch_util.launch_env (which prepends the PYTHONPATH given here)."""
    out = {"PYTHONPATH": str(FAULTS_DIR), KILL_RANK: str(kill_rank)}
    if kill_at_step is not None:
        out[KILL_AT_STEP] = str(kill_at_step)
    if kill_in_save_at_step is not None:
        out[KILL_IN_SAVE_AT_STEP] = str(kill_in_save_at_step)
    return out


def _step(name: str) -> Optional[int]:
    value = os.environ.get(name, "")
    return int(value) if value else None


def _targeted() -> bool:
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    return first_attempt and int(os.environ.get("RANK", "0")) == int(os.environ.get(KILL_RANK, "0"))


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _patch(module) -> None:
    at_step, in_save = _step(KILL_AT_STEP), _step(KILL_IN_SAVE_AT_STEP)
    if at_step is not None:
        save_for_train = module.save_for_train

        @functools.wraps(save_for_train)
        def killing_save_for_train(runner, run, step, *args, **kwargs):
            result = save_for_train(runner, run, step, *args, **kwargs)
            if step == at_step and _targeted():
                _die()
            return result

        module.save_for_train = killing_save_for_train
    if in_save is not None:
        save = module.save

        @functools.wraps(save)
        def killing_save(root, step, write, *args, **kwargs):
            def write_then_die(tmp):
                write(tmp)
                if step == in_save and _targeted():
                    _die()
            return save(root, step, write_then_die if step == in_save else write, *args, **kwargs)

        module.save = killing_save


class _PatchingLoader(importlib.abc.Loader):
    """The module's own loader, with `patch` run once the module body has executed."""

    def __init__(self, loader, patch: Callable):
        self._loader, self._patch = loader, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _PatchingLoader(spec.loader, _patch)
                return spec
        return None


def install() -> None:
    """Arm the requested faults in this process (a no-op when none is requested)."""
    if _step(KILL_AT_STEP) is None and _step(KILL_IN_SAVE_AT_STEP) is None:
        return
    if TARGET in sys.modules:  # imported before start-up finished: patch it where it is
        _patch(sys.modules[TARGET])
    else:
        sys.meta_path.insert(0, _Finder())
