"""The FSDP2 backend's torch gate admits exactly the releases its tests passed on (2.13, 2.14)."""
from __future__ import annotations

import pytest

from lisa_dist.fsdp import _compat

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("version", ["2.13.0+cpu", "2.13.1", "2.14.1+cu130", "2.14.0"])
def test_tested_releases_pass(version, monkeypatch):
    monkeypatch.delenv("LISA_DIST_UNTESTED_TORCH", raising=False)
    _compat.check_torch_version(version)


@pytest.mark.parametrize("version", ["2.11.0+cu130", "2.12.1", "2.15.0", "3.0.0"])
def test_other_releases_get_the_fix(version, monkeypatch):
    monkeypatch.delenv("LISA_DIST_UNTESTED_TORCH", raising=False)
    with pytest.raises(RuntimeError) as err:
        _compat.check_torch_version(version)
    message = str(err.value)
    assert f"this is torch {version}" in message and "2.13.x-2.14.x" in message
    assert ">=2.13,<2.15" in message and "LISA_DIST_UNTESTED_TORCH=1" in message


def test_override_runs_anyway(monkeypatch):
    monkeypatch.setenv("LISA_DIST_UNTESTED_TORCH", "1")
    _compat.check_torch_version("2.11.0+cu130")


def test_frozen_unit_reduce_dtype_by_release():
    # What check_dtype_fixup_needed asserts per release: 2.13 loses the dtype, 2.14 keeps it.
    assert not _compat.frozen_units_keep_reduce_dtype("2.13.0+cpu")
    assert _compat.frozen_units_keep_reduce_dtype("2.14.1+cu130")
