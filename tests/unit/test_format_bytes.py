"""lisa_dist.memory.format_bytes: the one byte formatter of lisa-train's summary, the dry run's tables
and the benchmarks' result tables."""
from __future__ import annotations

import pytest

from lisa_dist.memory import byte_unit, format_bytes


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 * 1024 ** 2, "5.0 MiB"),
    (3.25 * 1024 ** 3, "3.2 GiB"), (2048 * 1024 ** 3, "2048.0 GiB"), (-2048, "-2.0 KiB"),
])
def test_the_unit_follows_the_size(n, text):
    assert format_bytes(n) == text


def test_a_table_keeps_one_unit_and_its_digits():
    unit = byte_unit(3 * 1024 ** 2)  # the table's largest figure
    assert unit == "MiB"
    assert format_bytes(512 * 1024, unit, 2) == "0.50 MiB"
    assert format_bytes(6431232, "MiB", 3) == "6.133 MiB"
    assert format_bytes(6431232, "MiB", 1, suffix=False) == "6.1"
    assert format_bytes(68_976_648_192 * 2, "GiB", 1, suffix=False) == "128.5"
    assert byte_unit(100) == "B" and format_bytes(100, "B", 2) == "100.00 B"


def test_an_unknown_unit_is_named():
    with pytest.raises(ValueError, match="unknown byte unit 'MB'; expected one of B, KiB, MiB, GiB"):
        format_bytes(1, "MB")
