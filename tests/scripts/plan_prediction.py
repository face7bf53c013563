"""What `lisa-train --dry-run` predicts for a model a check has just measured: the launched check
scripts compare the plan with the model-state bytes they counted on the live engine."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict, Optional

from lisa_dist.config import LisaConfig
from lisa_dist.recipe.plan import build_plan
from lisa_dist.recipe.run_config import RunConfig


def dry_run_prediction(model, lisa: LisaConfig, backend: str, world: int, dtype: str = "bf16",
                       ds_config: Optional[dict] = None) -> Dict:
    """The dry run's per-rank floors (full and LISA) for `model`'s config, as lisa-train would plan
    it: the config is written with save_pretrained (the dry run reads nothing else) and the world
    size comes from WORLD_SIZE, as under a launcher."""
    with tempfile.TemporaryDirectory() as d:
        model.config.save_pretrained(d)
        extra = {}
        if ds_config is not None:
            path = Path(d) / "ds.json"
            path.write_text(json.dumps(ds_config))
            extra["deepspeed"] = str(path)
        run = RunConfig(model=d, backend=backend, dtype=dtype, lisa=LisaConfig(
            activated_layers=lisa.activated_layers, interval_steps=lisa.interval_steps, seed=lisa.seed), **extra)
        plan = build_plan(run, {"WORLD_SIZE": str(world)}, methods=())  # the floors only
    return {"stage": plan.stage, "world_size": plan.world_size, "psi": plan.counts.total,
            "psi_active": plan.psi_active, "full": plan.full, "lisa": plan.lisa, "lora": plan.lora}
