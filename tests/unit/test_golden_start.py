"""The golden losses of every distributed backend start from the same weights (tests/golden/train_losses.json)."""
from __future__ import annotations

import json
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "train_losses.json"


def test_distributed_backends_start_from_the_same_weights():
    """The 2-rank runs see the same first batch, so equal weights give an equal first loss: the
    presets' init is the single-process one on every backend (ZeRO-3 included, not zero.Init's)."""
    golden = json.loads(GOLDEN.read_text())
    assert golden["zero2"][0] == golden["zero3"][0] == golden["fsdp2"][0]
