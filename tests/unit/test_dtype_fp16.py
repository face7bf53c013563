"""`lisa-train --dtype fp16`: DeepSpeed only, with its dynamic loss scaler; refused elsewhere.

The DeepSpeed run itself (a few lisa-train steps in fp16 through the recipe's backend) is the
`lisa_train_fp16` scenario of the ZeRO-2 launch (tests/scripts/zero12_checks.py), asserted in
tests/distributed/test_deepspeed_zero12.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from launch_util import ROOT
from lisa_dist.recipe.ds_config import resolve_ds_config
from lisa_dist.recipe.modeling import weights_dtype
from lisa_dist.recipe.run_config import RunConfig, parse_args

ZERO2 = str(ROOT / "ds_configs" / "zero2.json")


def test_fp16_sets_deepspeeds_dynamic_loss_scaling():
    run = parse_args(["--backend", "deepspeed", "--deepspeed", ZERO2, "--dtype", "fp16"])
    assert weights_dtype(run.dtype) == torch.float16
    cfg = resolve_ds_config(run, weights_dtype(run.dtype))
    assert cfg["fp16"] == {"enabled": True, "loss_scale": 0}  # 0: dynamic
    assert cfg["bf16"]["enabled"] is False


def test_fp16_keeps_the_files_scaler_settings_and_other_dtypes_drop_them(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                                "fp16": {"enabled": False, "initial_scale_power": 12, "loss_scale_window": 50}}))
    fp16 = resolve_ds_config(RunConfig(backend="deepspeed", deepspeed=str(path), dtype="fp16"), torch.float16)
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 50}
    assert fp16["bf16"]["enabled"] is False
    for dtype in (torch.bfloat16, torch.float32):
        cfg = resolve_ds_config(RunConfig(backend="deepspeed", deepspeed=str(path)), dtype)
        assert "fp16" not in cfg and cfg["bf16"]["enabled"] is (dtype == torch.bfloat16)


@pytest.mark.parametrize("backend", ["single", "fsdp2"])
def test_fp16_refused_outside_deepspeed(backend):
    with pytest.raises(ValueError, match=rf"--dtype fp16 needs --backend deepspeed .*--backend {backend} trains in "
                                         r"bf16 or fp32: use --dtype bf16 or --dtype fp32"):
        RunConfig(backend=backend, dtype="fp16")


def test_fp16_refusal_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "lisa_dist.train", "--dtype", "fp16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--dtype fp16 needs --backend deepspeed" in proc.stderr and "Traceback" not in proc.stderr


def test_fp16_on_an_accelerator_without_fp16_exits_2_before_building_the_model():
    """DeepSpeed's own refusal comes from deep inside deepspeed.initialize, after the model is built;
    lisa-train refuses first, naming the fix. Runs where the accelerator lacks fp16 (this CPU)."""
    from lisa_dist.backends.deepspeed.process_group import fp16_supported
    if fp16_supported():
        pytest.skip("DeepSpeed's accelerator here supports fp16")
    proc = subprocess.run([sys.executable, "-m", "lisa_dist.train", "--backend", "deepspeed", "--deepspeed", ZERO2,
                           "--dtype", "fp16", "--steps", "1", "--no-save"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "--dtype fp16: DeepSpeed's accelerator on this machine has no fp16 support" in proc.stderr
    assert "use --dtype bf16 or --dtype fp32" in proc.stderr and "Traceback" not in proc.stderr


def test_dry_run_counts_fp16_weights_at_2_bytes():
    from lisa_dist.recipe.plan import _weight_bytes
    assert _weight_bytes(RunConfig(backend="deepspeed", deepspeed=ZERO2, dtype="fp16")) == (
        2, "fp16 weights (--dtype fp16)")
