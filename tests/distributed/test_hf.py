"""lisa_dist.integrations.hf.LisaCallback inside real Trainer and SFTTrainer runs on a tiny Llama (fp32, CPU).

One launch per backend runs every scenario of tests/scripts/hf_checks.py, each DeepSpeed stage under a
different launcher: ZeRO-1 through `accelerate launch --use_deepspeed --deepspeed_config_file`
(accelerate's plugin, no deepspeed= in TrainingArguments), ZeRO-2 through `torchrun
--nproc_per_node 2` and ZeRO-3 through `deepspeed --num_gpus 2` (both TrainingArguments(deepspeed=...)),
DDP and FSDP2 (TrainingArguments(fsdp=True, fsdp_config={"fsdp_version": 2})) through torchrun, and
one process. The ranks assert each check as it happens (frozen layers bit-identical through every
step, active layers moved, weight decay per group) and write what they measured; the tests below
assert on those records.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch_util import ROOT, accelerate_launch, deepspeed_launch, launch_env, output_tail, torchrun_launch
from lisa_dist import LisaConfig
from lisa_dist.sampling import LayerSampler

SCRIPT = ROOT / "tests" / "scripts" / "hf_checks.py"
WORLD = 2
BACKENDS = ["zero1", "zero2", "zero3", "ddp", "fsdp2", "single"]


def launcher_config(out) -> list:
    """accelerate launch's DeepSpeed arguments: hf_checks' ZeRO-1 config, written to a file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("hf_checks", SCRIPT)
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    path = out / "ds_zero1.json"
    path.write_text(json.dumps(checks.ds_config(1)))
    return ["--use_deepspeed", f"--deepspeed_config_file={path}"]


@pytest.fixture(scope="module", params=BACKENDS)
def ranks(request, tmp_path_factory):
    backend = request.param
    out = tmp_path_factory.mktemp(backend)
    args = ["--backend", backend, "--out", str(out)]
    if backend == "zero1":
        proc = accelerate_launch(SCRIPT, [*args, "--ds-config-from-launcher"], nproc=WORLD,
                                 launcher_args=launcher_config(out))
    elif backend == "zero3":
        proc = deepspeed_launch(SCRIPT, args, nproc=WORLD)
    elif backend in ("zero2", "ddp", "fsdp2"):
        proc = torchrun_launch(SCRIPT, args, nproc=WORLD)
    else:
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=launch_env(),
                              capture_output=True, text=True, timeout=600)
    world = 1 if backend == "single" else WORLD
    assert proc.returncode == 0, f"{backend} launch failed (rc {proc.returncode}):\n{output_tail(proc)}"
    files = [out / f"rank{r}.json" for r in range(world)]
    missing = [f.name for f in files if not f.is_file()]
    assert not missing, f"ranks did not write results: {missing}\n{output_tail(proc)}"
    return backend, [json.loads(f.read_text()) for f in files]



def test_engine_is_lisa_from_birth(ranks):
    backend, results = ranks
    want = "deepspeed" if backend.startswith("zero") else backend
    for r in results:
        assert r["main"]["backend"] == want
        if backend.startswith("zero"):  # the launcher's or TrainingArguments' config took effect
            assert r["main"]["bytes"]["stage"] == backend


def test_optimizer_bytes_at_the_floor(ranks):
    _, results = ranks
    for r in results:
        b = r["main"]["bytes"]
        assert 0.99 <= b["ratio_to_floor"] <= 1.05, b
        assert b["got"] < 0.5 * b["full_finetune"], b


def test_frozen_layers_bit_identical_and_active_layers_moved(ranks):
    _, results = ranks
    for r in results:
        m = r["main"]
        # 8 steps x 6 layers, gamma = 2: every step checked 4 frozen and 2 moving layers
        assert m["frozen_checks"] == 8 * 4 and m["moved_checks"] == 8 * 2, m
        assert r["sft"]["frozen_checks"] == 4 * 3 and r["sft"]["moved_checks"] == 4, r["sft"]


def test_no_weight_decay_on_biases_and_norms(ranks):
    _, results = ranks
    for r in results:
        # checked at train begin and after each of the 4 switches, group by group
        assert r["main"]["group_checks"] == 5


def test_schedule_is_the_layer_sampler(ranks):
    _, results = ranks
    sampler = LayerSampler(6, LisaConfig(activated_layers=2, interval_steps=2, seed=3))
    for r in results:
        for step, k, active in r["main"]["schedule"]:
            assert k == step // 2 and tuple(active) == sampler.active_layers(k)


def test_lr_schedule_follows_across_switches(ranks):
    _, results = ranks
    for r in results:
        lrs = r["main"]["lrs"]
        assert len(lrs) == 8
        for s, groups in enumerate(lrs, start=1):
            assert all(abs(lr - 1e-3 * (1 - s / 8)) <= 1e-12 for lr in groups), (s, groups)


def test_weights_match_lisa_optimizer_and_ranks_agree(ranks):
    backend, results = ranks
    for r in results:
        m = r["main"]
        assert m["ref_max_abs_diff"] <= 5e-5 < m["mean_abs_update"], m
        assert m["ranks_identical"]
        if backend != "single":
            assert m["distinct_data"]


def test_resume_is_bit_identical_mid_interval_and_at_a_switch(ranks):
    _, results = ranks
    for r in results:
        resume = r["main"]["resume"]
        if "skipped" in resume:  # an upstream bug of this release, named by hf_checks.resume_unsupported
            pytest.skip(resume["skipped"])
        assert set(resume) == {"3", "6"}
        for ckpt, res in resume.items():
            assert res["bit_identical"], (ckpt, res)


def test_save_model_loads_with_from_pretrained(ranks):
    _, results = ranks
    assert results[0]["main"]["reload_max_diff"] == 0.0


def test_lisa_metrics_in_trainer_logs(ranks):
    _, results = ranks
    logged = results[0]["main"]["logged"]
    assert {"lisa/active_layers", "lisa/switch_index", "lisa/optimizer_bytes"} <= set(logged)


def test_sft_trainer_trains_with_lisa(ranks):
    _, results = ranks
    for r in results:
        s = r["sft"]
        assert s["ranks_identical"] and len(s["losses"]) == 4
        assert [k for _, k, _ in s["schedule"]] == [0, 1, 1, 2]


def test_late_callback_fails_before_any_engine(ranks):
    _, results = ranks
    assert "attach" in results[0]["late"]["message"]


def test_deepspeed_config_optimizer_and_scheduler(ranks):
    backend, results = ranks
    if not backend.startswith("zero"):
        pytest.skip("DeepSpeed config sections")
    for r in results:
        s = r["ds_sections"]
        # one switch per step; DeepSpeed's WarmupLR reaches every group after every rebuild
        assert s["frozen_checks"] == 5 * 4 and s["moved_checks"] == 2 * s["steps_with_lr"] >= 6  # warmup from lr 0
        assert [g[0] for g in s["lrs"]] == pytest.approx(s["expected"], abs=1e-12)


def test_accelerate_prepare_in_a_hand_written_loop(ranks):
    backend, results = ranks
    want = "deepspeed" if backend.startswith("zero") else backend
    for r in results:
        a = r["accelerate"]
        # a LambdaLR built before prepare: each group's lr asserted per step in the rank
        assert a["backend"] == want and a["switch_index"] == 3 and len(a["lrs"]) == 6
        assert a["ranks_identical"]


def test_ddp_reduces_only_the_active_layers(ranks):
    backend, results = ranks
    if backend != "ddp":
        pytest.skip("DDP only")
    for r in results:
        d = r["main"]["ddp"]
        assert d["ignored_is_layers"] and d["reduced_numel"] == d["expected_numel"] > 0, d


def test_fsdp2_shards_per_layer_with_a_lisa_optimizer(ranks):
    backend, results = ranks
    if backend != "fsdp2":
        pytest.skip("FSDP2 only")
    for r in results:
        for layout in (r["main"]["fsdp2"], r["bf16"]["layout"], r["accelerate"]["layout"]):
            # 6 decoder-layer units + the root; frozen layers hold no gradient; active units reduce in fp32
            assert layout["layer_units"] and layout["root_is_unit"] and layout["units"] == 7, layout
            assert layout["optimizer"] == "FSDPLisaOptimizer" and layout["frozen_grads"] == 0, layout
            assert layout["active_reduce_dtypes"] == ["torch.float32"], layout


def test_fsdp2_bf16_weights_at_the_floor_with_gradient_checkpointing(ranks):
    backend, results = ranks
    if backend != "fsdp2":
        pytest.skip("FSDP2 only")
    for r in results:
        b = r["bf16"]
        # bf16 shards for every weight; fp32 master + Adam (12 bytes per active parameter / N) only for the active set
        assert b["weight_dtypes"] == ["torch.bfloat16"] and b["gradient_checkpointing"], b
        assert 0.99 <= b["bytes"]["ratio_to_floor"] <= 1.05 and b["bytes"]["got"] < 0.5 * b["bytes"]["full_finetune"], b
        assert b["frozen_checks"] == 3 * 4 and b["moved_checks"] == 3 * 2, b


def test_fsdp2_accelerate_save_state_resumes_bit_identically(ranks):
    backend, results = ranks
    if backend != "fsdp2":
        pytest.skip("FSDP2 only")
    for r in results:
        a = r["accelerate_resume"]
        assert set(a["resume"]) == {"3", "4"} and all(x["bit_identical"] for x in a["resume"].values()), a
        assert "optimizer_0" in a["optimizer_dirs"], a


def test_fsdp2_unsupported_plugin_settings_are_refused(ranks):
    backend, results = ranks
    if backend != "fsdp2":
        pytest.skip("FSDP2 only")
    messages = results[0]["fsdp_refusals"]["messages"]
    assert set(messages) == {"activation_checkpointing", "cpu_ram_efficient_loading"}, messages
