"""What the ZeRO-2 and ZeRO-3 launches must show for sampling="gradient" and "outlier"
(tests/scripts/importance_checks.py), asserted from their per-rank results."""
from __future__ import annotations

from typing import Dict, List

import pytest


def assert_importance_statistics_agree(ranks: List[Dict]) -> None:
    """Every rank holds the same statistics, they match the single-process reference, and both modes
    resume bit-identical."""
    if "importance_gradient" not in ranks[0]:
        pytest.skip("run under ZeRO-2 and ZeRO-3 only")
    for rank in ranks:
        g, o = rank["importance_gradient"], rank["importance_outlier"]
        assert g["ranks_identical"] and g["resume_bit_identical"] and g["pending_steps_at_save"] == 1
        assert g["ema_max_rel_diff"] < 1e-5 and all(e is not None for e in g["ema"])
        assert [list(e) for e in g["schedule"]] == [list(e) for e in g["reference_schedule"]]
        assert min(g["probabilities"]) >= 0.1 / 6 - 1e-12
        assert o["ranks_identical"] and o["resume_bit_identical"] and max(range(6), key=lambda i: o["ratios"][i]) == 4
        assert o["ratios"] == pytest.approx(o["reference_ratios"], abs=1e-4)
    assert ranks[0]["importance_gradient"]["ema"] == ranks[1]["importance_gradient"]["ema"]
    assert ranks[0]["importance_outlier"]["ratios"] == ranks[1]["importance_outlier"]["ratios"]
