"""Shared by every tier: the tier marker of each test is its folder (tests/unit -> `unit`, ...), the
support modules import by name, launched ranks get one intra-op thread, and no test may leave
DeepSpeed's shared-memory segments behind."""
import os
import sys

# Tiny models on a 2-core box: intra-op threads only add contention (measured 50x slower steps
# with two test processes each spinning 2 threads). Launched ranks inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "distributed", "launch", "slurm", "multinode", "realmodel", "gpu")
"""The folders under tests/ that hold tests; each is also the pytest marker of what it holds (pytest.ini)."""
sys.path.insert(0, str(TESTS / "support"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in one of tests/{{{','.join(TIERS)}}}/, which gives "
                                    "them their marker; move it there")
        item.add_marker(getattr(pytest.mark, tier))

SHM = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer_"


def _deepspeed_segments() -> set:
    return {p.name for p in SHM.glob(SHM_PREFIX + "*")} if SHM.is_dir() else set()


@pytest.fixture(autouse=True)
def no_leaked_deepspeed_shm():
    """DeepSpeed's CPU all-reduce maps a 66 MiB /dev/shm segment per rank and never unlinks it;
    lisa_dist unlinks them once every rank has mapped its peers (process_group.release_shm_segments).
    A launch that leaves one behind fails here, and the segment is removed: /dev/shm is RAM, and a
    clean-clone CI run that leaked 132 MiB per launch ran out of memory after ~150 launches."""
    before = _deepspeed_segments()
    yield
    leaked = sorted(_deepspeed_segments() - before)
    for name in leaked:
        (SHM / name).unlink(missing_ok=True)
    assert not leaked, f"DeepSpeed shared-memory segments left in /dev/shm: {leaked}"
