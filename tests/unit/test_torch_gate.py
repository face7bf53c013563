"""The torch adapter of the FSDP2 backend: its probes pass on the installed torch, name what a
release lacks, and read FSDP2's param groups in both shapes torch has had."""
from __future__ import annotations

import types

import pytest
from fsdp_internals import frozen_units_keep_reduce_dtype
from version_checks import forget_version_checks

from lisa_dist import versions
from lisa_dist.backends import torch_compat as _compat


@pytest.fixture(autouse=True)
def fresh():
    forget_version_checks()
    yield
    forget_version_checks()


def test_probes_pass_on_the_installed_torch():
    _compat.check_torch()


def test_a_missing_private_method_is_named(monkeypatch):
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    monkeypatch.delattr(FSDPParamGroup, "_init_mp_dtypes")
    with pytest.raises(versions.IncompatibleReleaseError,
                       match=r"FSDPParamGroup\._init_mp_dtypes \(last seen in torch"):
        _compat.check_torch()


class _Unit:
    def __init__(self, state):
        self._state = state

    def _get_fsdp_state(self):
        return self._state


def test_param_groups_of_both_layouts():
    """torch 2.12+ keeps a list (`_fsdp_param_groups`), torch 2.11 one optional `_fsdp_param_group`
    (the GPU image's torch): both are read; a state with neither is refused by name."""
    group = object()
    assert _compat._param_groups(_Unit(types.SimpleNamespace(_fsdp_param_groups=[group]))) == [group]
    assert _compat._param_groups(_Unit(types.SimpleNamespace(_fsdp_param_group=group))) == [group]
    assert _compat._param_groups(_Unit(types.SimpleNamespace(_fsdp_param_group=None))) == []
    with pytest.raises(versions.IncompatibleReleaseError, match="_fsdp_param_groups"):
        _compat._param_groups(_Unit(types.SimpleNamespace()))


def test_frozen_unit_reduce_dtype_by_release():
    # What check_dtype_fixup_needed asserts per release: before 2.14 the dtype is lost, from 2.14 kept.
    assert not frozen_units_keep_reduce_dtype("2.11.0+cu130")
    assert not frozen_units_keep_reduce_dtype("2.13.0+cpu")
    assert frozen_units_keep_reduce_dtype("2.14.1+cu130")
    assert frozen_units_keep_reduce_dtype("2.15.0")
