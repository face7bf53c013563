"""The dry run's prediction against the model states a distributed memory check measured, shared by
the ZeRO-1/2, ZeRO-3 and FSDP2 test files (tests/scripts/plan_prediction.py records both)."""
from __future__ import annotations


def assert_dry_run_predicts(ranks, tolerance: float = 0.10) -> None:
    """Every rank: the dry run counted the same parameters (where the check recorded its own count)
    and its LISA per-rank floor is within `tolerance` of the model states counted on the live engine."""
    for rank in ranks:
        m = rank["memory"]
        if "psi" in m:
            assert (m["dry_run"]["psi"], m["dry_run"]["psi_active"]) == (m["psi"], m["psi_active"]), m["dry_run"]
        assert abs(m["in_step_over_dry_run"] - 1) <= tolerance, (m["in_step_over_dry_run"], m["dry_run"]["lisa"])
