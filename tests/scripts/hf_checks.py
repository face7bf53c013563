"""Hugging Face Trainer / SFTTrainer with lisa_dist.integrations.hf.LisaCallback, run by tests/distributed/test_hf.py:

    deepspeed --num_gpus 2 tests/scripts/hf_checks.py --backend zero2 --out /tmp/x
    torchrun --nproc_per_node 2 tests/scripts/hf_checks.py --backend ddp --out /tmp/x
    torchrun --nproc_per_node 2 tests/scripts/hf_checks.py --backend fsdp2 --out /tmp/x
    python tests/scripts/hf_checks.py --backend single --out /tmp/x

Every scenario is a real Trainer run on a tiny Llama (fp32, CPU, `use_cpu=True` so accelerate sees
every rank); a failed check raises, so the rank exits non-zero. Each rank writes OUT/rank<r>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import (  # noqa: E402
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    get_linear_schedule_with_warmup,
)

import builders  # noqa: E402
from builders import tiny_llama  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lisa_dist import LayerSampler, LisaConfig, LisaOptimizer  # noqa: E402
from lisa_dist.integrations.hf import LisaCallback  # noqa: E402
from lisa_dist.memory import count_params, model_state_floor  # noqa: E402

torch.set_num_threads(1)

VOCAB, SEQ, MB, GAS = 256, 16, 2, 2
LR, WD = 1e-3, 0.01
LAYERS = 6


def build_model(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(LAYERS, 64, seed=seed, vocab=VOCAB, attention_bias=True, use_cache=False)


class Tokens(torch.utils.data.Dataset):
    """Fixed random sequences; remembers which rows this process read, in order."""

    def __init__(self, n: int = 256, seed: int = 123):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.read: List[int] = []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.read.append(int(i))
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def ds_config(stage: int) -> dict:
    # "auto": the Trainer fills in its own batch, accumulation and clipping
    return builders.ds_config(stage, "auto", gas="auto", train_batch="auto", clip="auto",
                              stage3_prefetch_bucket_size=50_000, stage3_param_persistence_threshold=0,
                              stage3_gather_16bit_weights_on_model_save=True)


# True under `accelerate launch --use_deepspeed --deepspeed_config_file F`: accelerate's plugin, built
# from the launcher's config file, configures DeepSpeed, and TrainingArguments name none.
DS_FROM_LAUNCHER = False


def deepspeed_arg(backend: str) -> dict:
    """TrainingArguments' deepspeed= for this backend, unless the launcher supplies the config."""
    if not backend.startswith("zero") or DS_FROM_LAUNCHER:
        return {}
    return {"deepspeed": ds_config(int(backend[-1]))}


def fsdp2_args() -> dict:
    """accelerate's FSDP plugin at version 2, as a user writes it in TrainingArguments; a full state
    dict so that save_model writes a folder from_pretrained loads."""
    return {"fsdp": True, "fsdp_config": {"fsdp_version": 2, "state_dict_type": "FULL_STATE_DICT"}}


def backend_args(backend: str) -> dict:
    """TrainingArguments' deepspeed= or fsdp= for this backend."""
    return fsdp2_args() if backend == "fsdp2" else deepspeed_arg(backend)


def let_accelerate_shard_on_cpu() -> None:
    """accelerate 1.15 turns an FSDP plugin on only for accelerator devices (accelerate/state.py:986-1016:
    the FSDP branch is inside `distributed_type in [MULTI_GPU, MULTI_NPU, ...]`); a CPU gloo world
    silently gets DDP instead. Nothing after that choice depends on the device (FSDP2 runs on gloo,
    tests/distributed/test_fsdp2.py), so on this CPU-only machine the FSDP2 checks make the real AcceleratorState
    take the plugin as it would on GPUs. Everything else (Trainer, accelerate, torch) is unchanged."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def training_args(out: Path, backend: str, max_steps: int, **kw) -> TrainingArguments:
    extra = backend_args(backend)
    base = dict(output_dir=str(out), per_device_train_batch_size=MB, gradient_accumulation_steps=GAS,
                max_steps=max_steps, learning_rate=LR, weight_decay=WD, lr_scheduler_type="linear", warmup_steps=0,
                max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True, optim="adamw_torch", dataloader_num_workers=0)
    base.update(extra)
    base.update(kw)
    return TrainingArguments(**base)


def layer_tensors(model, layer) -> List[torch.Tensor]:
    """This rank's copy of a layer's weights (its ZeRO-3 partition or FSDP2 shard, else the full tensors)."""
    return [(p.ds_tensor if hasattr(p, "ds_tensor") else local(p)).detach().clone() for p in layer.parameters()]


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Probe(TrainerCallback):
    """Checks what LISA promises at every optimizer step, from inside Trainer's loop."""

    def __init__(self, lisa_cb: LisaCallback, model, decay_names: set, expect_decay_split: bool = True):
        self.cb, self.model, self.decay_names = lisa_cb, model, decay_names
        self.expect_decay_split = expect_decay_split
        self.layers = model.model.layers
        self.frozen_checks = 0
        self.moved_checks = 0
        self.lrs: List[List[float]] = []
        self.group_checks = 0
        self.schedule: List = []
        self.lrs_before: List[float] = []
        self.trained: List[List[int]] = []

    def _groups(self):
        if self.cb.engine is not None:
            return self.cb.engine.basic_optimizer.param_groups
        return self.cb.optimizer.param_groups

    def _named_groups(self):
        """(weight_decay, parameter names) per optimizer group."""
        if self.cb.engine is not None:
            # ZeRO's groups hold flat fp32 partitions; LISA's group list says which params each covers.
            lisa = self.cb.engine.lisa
            names = {id(p): n for n, p in self.model.named_parameters()}
            return [(g["weight_decay"], [names[id(p)] for p in params])
                    for g, (_, params) in zip(self._groups(), lisa.groups(lisa.active_layers))]
        opt = self.cb.optimizer
        names = {id(m): opt._names[p] for p, m in opt._masters.items()}
        return [(g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in self._groups()]

    def check_groups(self):
        if not self.expect_decay_split:
            return
        groups = self._named_groups()
        assert len(groups) == len(self._groups())
        for wd, names in groups:
            for n in names:
                want = WD if n in self.decay_names else 0.0
                assert wd == want, f"{n}: weight_decay {wd} expected {want}"
        assert {wd for wd, _ in groups} == {WD, 0.0}, groups
        self.group_checks += 1

    def on_train_begin(self, args, state, control, **kw):
        self.check_groups()

    def on_step_begin(self, args, state, control, **kw):
        self.before = set(self.cb.active_layers)
        self.snap = [layer_tensors(self.model, layer) for layer in self.layers]
        self.switch_before = self.cb.switch_index
        self.lr_before = self._groups()[0]["lr"]
        self.lrs_before.append(self.lr_before)

    def on_step_end(self, args, state, control, **kw):
        for i, layer in enumerate(self.layers):
            now = layer_tensors(self.model, layer)
            same = all(torch.equal(a, b) for a, b in zip(now, self.snap[i]))
            if i in self.before:
                if self.lr_before == 0.0:  # a warmup's first step
                    continue
                assert not same, f"active layer {i} did not move at step {state.global_step}"
                self.moved_checks += 1
            else:
                assert same, f"frozen layer {i} changed at step {state.global_step} (active {sorted(self.before)})"
                self.frozen_checks += 1
        lrs = [g["lr"] for g in self._groups()]
        assert all(lr == lrs[0] for lr in lrs), f"groups disagree on lr: {lrs}"
        self.lrs.append(lrs)
        if self.cb.switch_index != self.switch_before:
            self.check_groups()
        else:  # mid-interval every active group has its moments: the bytes to compare with the floor
            self.bytes = optimizer_bytes(self.cb)
        self.schedule.append([state.global_step, self.cb.switch_index, list(self.cb.active_layers)])
        self.trained.append(sorted(self.before))


def flat(model) -> torch.Tensor:
    """Every parameter, whole (FSDP2 shards are gathered: a collective)."""
    return torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().double().flatten()
                      for p in model.parameters()])


def full_weights(trainer) -> torch.Tensor:
    """Every parameter, gathered under ZeRO-3."""
    model = trainer.model
    if any(hasattr(p, "ds_tensor") for p in model.parameters()):
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return flat(model)
    return flat(model)


def ranks_equal(t: torch.Tensor) -> bool:
    if world() == 1:
        return True
    gathered = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def gather_reads(reads: List[int]) -> List[List[int]]:
    if world() == 1:
        return [reads]
    everyone = [None] * world()
    dist.all_gather_object(everyone, reads)
    return everyone


def reference(start, lisa: LisaConfig, decay_names: set, reads: List[List[int]], data: Tokens,
              steps: int) -> torch.Tensor:
    """LisaOptimizer on one process over the global batch of every optimizer step, with Trainer's
    decay/no-decay groups and linear schedule: what the Trainer run must match."""
    ref = copy.deepcopy(start)
    decay = [p for n, p in ref.named_parameters() if n in decay_names]
    nodecay = [p for n, p in ref.named_parameters() if n not in decay_names]
    base = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": nodecay, "weight_decay": 0.0}], lr=LR)
    opt = LisaOptimizer.from_optimizer(ref, lisa, base)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    n = len(reads)
    for s in range(steps):
        rows = []
        for j in range(GAS):
            for r in range(n):
                m = s * GAS + j
                rows.extend(reads[r][m * MB:(m + 1) * MB])
        ids = data.rows[rows]
        ref(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return flat(ref)


def decay_parameter_names(model) -> set:
    return set(Trainer.get_decay_parameter_names(None, model))


def make_trainer(out: Path, backend: str, lisa: LisaConfig, max_steps: int, model=None, **kw):
    model = build_model() if model is None else model
    data = Tokens()
    cb = LisaCallback(lisa)
    probe = Probe(cb, model, decay_parameter_names(model))
    trainer = Trainer(model=model, args=training_args(out, backend, max_steps, **kw), train_dataset=data,
                      callbacks=[cb, probe])
    return trainer, cb, probe, data


def optimizer_bytes(cb) -> Dict:
    """This rank's fp32 master + Adam bytes now, with the floor for the current active set."""
    split = (cb.engine.lisa.split if cb.engine is not None else cb.optimizer.split)
    counts = count_params(split)
    psi_a = counts.active(cb.active_layers)
    stage = (f"zero{cb.engine.zero_optimization_stage()}" if cb.engine is not None
             else "fsdp2" if cb.backend == "fsdp2" else "single")
    n = world() if cb.engine is not None or cb.backend == "fsdp2" else 1
    floor = model_state_floor(stage, counts.total, psi_a, n, weight_bytes=2)
    full = model_state_floor(stage, counts.total, counts.total, n, weight_bytes=2)
    # The floor's master + Adam bytes (12 per active parameter / N, docs/design.md#memory-floors): ZeRO keeps
    # an fp32 master partition even of fp32 weights.
    want = floor["master"] + floor["optimizer_state"]
    if cb.engine is not None:
        import lisa_dist.backends.deepspeed as lds
        b = lds.model_state_bytes(cb.engine)
        got = b["fp32_master"] + b["optimizer_state"]
    else:
        b = cb.optimizer.state_bytes()  # this rank's DTensor shards under FSDP2
        got = b["master"] + b["optimizer_state"]
        if split.always_params[0].dtype == torch.float32:
            # fp32 weights are LisaOptimizer's masters: only the moments (8 bytes per active param / N) remain.
            want = floor["optimizer_state"]
            full = {"master": 0, "optimizer_state": full["optimizer_state"]}
    return {"got": got, "floor": want, "full_finetune": full["master"] + full["optimizer_state"],
            "ratio_to_floor": got / want, "psi_active": psi_a, "psi": counts.total, "stage": stage}


def check_bytes(probe) -> Dict:
    out = probe.bytes
    assert 0.99 <= out["ratio_to_floor"] <= 1.05, f"optimizer bytes off the floor: {out}"
    return out


# --- scenarios ---------------------------------------------------------------------------------

def resume_unsupported(backend: str):
    """Why Trainer cannot resume this run on this stack, or None. transformers before 5.18 resumes the
    optimizer of a multi-process run with map_location=args.device, which on CPUs is "cpu:0", a
    location torch.load cannot restore (fixed in 5.18, trainer.py _load_optimizer_and_scheduler).
    GPU ranks get cuda:N and are not affected; neither are DeepSpeed (its own checkpoints) and FSDP2."""
    import transformers
    from packaging.version import Version
    if backend == "ddp" and not torch.cuda.is_available() and Version(transformers.__version__) < Version("5.18"):
        return (f"transformers {transformers.__version__} cannot resume a multi-process CPU run "
                "(torch.load(map_location='cpu:0'); fixed in transformers 5.18)")
    return None


def main_run(backend: str, out: Path) -> Dict:
    """Train 8 steps (K=2, gamma=2, grad accumulation 2) with checkpoints at 3 (mid-interval) and 6
    (a switch boundary), resume from both, save_model, compare with the reference."""
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=3)
    steps = 8
    start = build_model()
    trainer, cb, probe, data = make_trainer(out / "run", backend, lisa, steps, model=copy.deepcopy(start),
                                            save_strategy="steps", save_steps=3)
    trainer.train()
    final = full_weights(trainer)
    result = {"frozen_checks": probe.frozen_checks, "moved_checks": probe.moved_checks,
              "group_checks": probe.group_checks, "lrs": probe.lrs, "schedule": probe.schedule,
              "ranks_identical": ranks_equal(final), "bytes": check_bytes(probe),
              "backend": cb.backend}
    assert result["ranks_identical"], "ranks diverged"
    sampler = LayerSampler(LAYERS, lisa)
    for step, k, active in probe.schedule:
        assert k == step // lisa.interval_steps and tuple(active) == sampler.active_layers(k), (step, k, active)
    # Trainer's linear schedule, every group, every step, across switches.
    want = [LR * (1 - s / steps) for s in range(1, steps + 1)]
    assert all(abs(g[0] - w) <= 1e-12 for g, w in zip(probe.lrs, want)), (probe.lrs, want)
    if cb.backend == "fsdp2":
        result["fsdp2"] = check_fsdp2_layout(trainer.model, trainer.optimizer, cb.active_layers)
    if cb.backend == "ddp":
        # DDP handles the always-active parameters only; each step all-reduced exactly its active layers.
        layer_names = {n for n, _ in start.named_parameters() if n.startswith("model.layers.")}
        ignored = set(trainer.model_wrapped.parameters_to_ignore)
        layer_numel = [sum(p.numel() for p in layer.parameters()) for layer in trainer.model.model.layers]
        want_numel = sum(layer_numel[i] for active in probe.trained for i in active)
        result["ddp"] = {"ignored_is_layers": ignored == layer_names,
                         "reduced_numel": cb.prepared.reducer.reduced_numel,
                         "expected_numel": want_numel}
        assert ignored == layer_names and cb.prepared.reducer.reduced_numel == want_numel, result["ddp"]
    reads = gather_reads(data.read)
    # Each rank reads its own rows (use_cpu=True gives accelerate the real world size).
    used = steps * GAS * MB
    result["distinct_data"] = len({tuple(r[:used]) for r in reads}) == len(reads)
    assert result["distinct_data"], f"ranks read the same rows: {[r[:8] for r in reads]}"
    ref = reference(start, lisa, decay_parameter_names(start), reads, data, steps)
    diff = (final - ref).abs()
    result.update({"ref_max_abs_diff": diff.max().item(), "mean_abs_update": (ref - flat(start)).abs().mean().item()})
    assert result["ref_max_abs_diff"] <= 5e-5, f"weights differ from LisaOptimizer's: {result['ref_max_abs_diff']}"
    logged = [e for e in trainer.state.log_history if "lisa/active_layers" in e]
    result["logged"] = logged[-1] if logged else None
    assert len(logged) >= steps, "LISA metrics missing from Trainer's logs"
    assert all(e["lisa/active_layers"] == ",".join(map(str, sampler.active_layers(e["step"] // 2)))
               for e in logged if "loss" in e), logged

    saved = out / "saved"
    trainer.save_model(str(saved))
    if rank() == 0:
        # As a later process would load it: without the ZeRO-3 context Trainer's arguments set up
        # (from_pretrained would otherwise build the model under zero.Init, a collective).
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
        reloaded = LlamaForCausalLM.from_pretrained(str(saved))
        result["reload_max_diff"] = (flat(reloaded) - final).abs().max().item()
        assert result["reload_max_diff"] == 0.0, result["reload_max_diff"]
    del trainer, cb, probe
    skip = resume_unsupported(backend)
    if skip:
        result["resume"] = {"skipped": skip}
        return result
    resumed = {}
    for ckpt in (3, 6):
        t2, cb2, probe2, _ = make_trainer(out / "run", backend, lisa, steps, save_strategy="no")
        t2.train(resume_from_checkpoint=str(out / "run" / f"checkpoint-{ckpt}"))
        w = full_weights(t2)
        resumed[ckpt] = {"max_abs_diff": (w - final).abs().max().item(), "bit_identical": bool(torch.equal(w, final)),
                         "schedule": probe2.schedule}
        assert resumed[ckpt]["bit_identical"], f"resume from checkpoint-{ckpt} differs: {resumed[ckpt]}"
        del t2, cb2, probe2
    result["resume"] = resumed
    return result


def check_fsdp2_layout(model, optimizer, active_layers) -> Dict:
    """The model Trainer trains is sharded the lisa_dist.backends.fsdp way (a unit per decoder layer, the
    root for the rest, not accelerate's wrap policy), its optimizer is an FSDPLisaOptimizer, frozen
    layers hold no gradient, and every active unit reduce-scatters in fp32 after the switches."""
    from fsdp_internals import unit_reduce_dtype
    from torch.distributed.fsdp import FSDPModule

    from lisa_dist.backends.fsdp import FSDPLisaOptimizer
    from lisa_dist.integrations.hf_compat import unwrap_optimizer

    layers = list(model.model.layers)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    out = {"layer_units": all(isinstance(layer, FSDPModule) for layer in layers),
           "units": len(units), "root_is_unit": isinstance(model, FSDPModule),
           "optimizer": type(unwrap_optimizer(optimizer)).__name__,
           "active_reduce_dtypes": sorted({str(unit_reduce_dtype(layers[i])) for i in active_layers}),
           "frozen_grads": sum(p.grad is not None for i, layer in enumerate(layers) if i not in active_layers
                               for p in layer.parameters())}
    assert out["layer_units"] and out["root_is_unit"] and out["units"] == len(layers) + 1, out
    assert isinstance(unwrap_optimizer(optimizer), FSDPLisaOptimizer), out
    assert out["active_reduce_dtypes"] == ["torch.float32"] and out["frozen_grads"] == 0, out
    return out


def bf16_weights(backend: str, out: Path) -> Dict:
    """FSDP2 under mixed_precision bf16, with Trainer's gradient checkpointing: weights are sharded as
    bf16 (frozen layers cost 2 bytes per parameter / N) and only the active set has fp32 masters and
    moments, at the docs/design.md#memory-floors floor."""
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=5)
    trainer, cb, probe, _ = make_trainer(out / "bf16", backend, lisa, 3, bf16=True, gradient_checkpointing=True)
    trainer.train()
    dtypes = sorted({str(local(p).dtype) for p in trainer.model.parameters()})
    result = {"weight_dtypes": dtypes, "bytes": check_bytes(probe), "frozen_checks": probe.frozen_checks,
              "moved_checks": probe.moved_checks,
              "layout": check_fsdp2_layout(trainer.model, trainer.optimizer, cb.active_layers),
              "gradient_checkpointing": trainer.model.is_gradient_checkpointing}
    assert dtypes == ["torch.bfloat16"] and result["gradient_checkpointing"], result
    assert probe.frozen_checks == 3 * 4 and probe.moved_checks == 3 * 2, result
    del trainer, cb, probe
    return result


def fsdp_refusals(backend: str, out: Path) -> Dict:
    """FSDP plugin settings LISA does not implement stop train() with an error naming the fix, before
    accelerate wraps the model."""
    from accelerate.state import AcceleratorState

    # (FSDP1's plugin cannot be built without an accelerator device: accelerate/utils/dataclasses.py:2014.)
    cases = {"activation_checkpointing": ({"fsdp_version": 2, "activation_checkpointing": True}, ValueError,
                                          "gradient_checkpointing=True"),
             "cpu_ram_efficient_loading": ({"fsdp_version": 2, "cpu_ram_efficient_loading": True}, ValueError,
                                           "set it to false")}
    messages = {}
    environ = dict(os.environ)  # TrainingArguments exports fsdp_config as FSDP_* variables plugins read later
    for name, (config, error, fix) in cases.items():
        AcceleratorState._reset_state(reset_partial_state=True)  # each Trainer's own plugin
        model = build_model()
        cb = LisaCallback(LisaConfig(activated_layers=1, interval_steps=1))
        trainer = Trainer(model=model, args=training_args(out / name, backend, 2, fsdp=True, fsdp_config=config),
                          train_dataset=Tokens(), callbacks=[cb])
        try:
            trainer.train()
        except error as e:
            messages[name] = str(e)
        else:
            raise AssertionError(f"{name}: LISA trained under an FSDP setting it does not support")
        assert fix in messages[name] and cb.backend is None, (name, messages[name])
        del trainer, cb, model
    os.environ.clear()
    os.environ.update(environ)
    AcceleratorState._reset_state(reset_partial_state=True)
    return {"messages": messages}


def sft(backend: str, out: Path) -> Dict:
    """TRL's SFTTrainer with the same callback on a text dataset."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lisa_dist.recipe.presets import TEXT_DATA, default_tokenizer, tiny_llama_config

    tok = default_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_llama_config(len(tok), num_layers=4, hidden_size=64)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    model = LlamaForCausalLM(cfg)
    rows = [json.loads(line) for line in TEXT_DATA.read_text().splitlines()[:64]]
    ds = Dataset.from_list([{"text": r["text"]} for r in rows])
    extra = backend_args(backend)
    args = SFTConfig(output_dir=str(out / "sft"), per_device_train_batch_size=2, gradient_accumulation_steps=1,
                     max_steps=4, learning_rate=LR, weight_decay=WD, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True,
                     disable_tqdm=True, max_length=32, optim="adamw_torch", bf16=False, **extra)
    lisa = LisaConfig(activated_layers=1, interval_steps=2, seed=1)
    cb = LisaCallback(lisa)
    probe = Probe(cb, model, decay_parameter_names(model))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[cb, probe])
    trainer.train()
    assert cb.backend is not None
    result = {"schedule": probe.schedule, "frozen_checks": probe.frozen_checks, "moved_checks": probe.moved_checks,
              "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
              "ranks_identical": ranks_equal(full_weights(trainer))}
    assert result["ranks_identical"] and all(math.isfinite(x) for x in result["losses"]), result
    return result


def late_callback(backend: str, out: Path) -> Dict:
    """LisaCallback added with trainer.add_callback: a ValueError before any engine is built."""
    model = build_model()
    trainer = Trainer(model=model, args=training_args(out / "late", backend, 2), train_dataset=Tokens())
    cb = LisaCallback(LisaConfig(activated_layers=1, interval_steps=1))
    trainer.add_callback(cb)
    try:
        trainer.train()
    except ValueError as e:
        message = str(e)
    else:
        raise AssertionError("a late LisaCallback trained without LISA")
    assert "attach" in message and cb.backend is None, message
    # attach() makes the same callback work.
    del trainer
    return {"message": message}


def hand_loop(backend: str, out: Path) -> Dict:
    """lisa_dist.integrations.accelerate.prepare in a hand-written accelerate loop, a torch LambdaLR built over the
    (decay / no-decay) optimizer before prepare: every group follows it across switches (DeepSpeed:
    the optimizer object is re-filled; one device / DDP: the scheduler moves to the LisaOptimizer)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin

    from lisa_dist.integrations.accelerate import prepare, prepared_state

    AcceleratorState._reset_state(reset_partial_state=True)  # the Trainer runs above configured their own
    model = build_model()
    names = decay_parameter_names(model)
    opt = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if n in names], "weight_decay": WD},
                             {"params": [p for n, p in model.named_parameters() if n not in names],
                              "weight_decay": 0.0}], lr=LR)
    lam = lambda s: 1.0 / (1 + s)  # noqa: E731
    plugin = None
    if backend.startswith("zero"):
        cfg = ds_config(int(backend[-1]))
        cfg.update(train_micro_batch_size_per_gpu=MB, gradient_accumulation_steps=1,
                   train_batch_size=MB * world(), gradient_clipping=0.0)
        plugin = DeepSpeedPlugin(hf_ds_config=cfg)
    # cpu=True would switch DeepSpeed off; without a GPU DeepSpeed runs on the CPU anyway.
    if plugin is not None:
        acc = Accelerator(deepspeed_plugin=plugin)
    elif backend == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin
        acc = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
    else:
        acc = Accelerator(cpu=True)
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=MB)
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    engine, opt, loader, sched = prepare(acc, model, opt, loader, sched, lisa=lisa)
    state = prepared_state(model)
    lrs, decays = [], set()
    for step, batch in zip(range(6), loader):
        acc.backward(engine(**batch).loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        groups = opt.param_groups
        lrs.append([g["lr"] for g in groups])
        decays |= {g["weight_decay"] for g in groups}
        # accelerate steps a scheduler once per process per optimizer step (the batch is N times larger)
        assert all(abs(lr - LR * lam(acc.num_processes * (step + 1))) <= 1e-12 for lr in lrs[-1]), (step, lrs[-1])
    assert state.switch_index == 3 and decays == {WD, 0.0}, (state.switch_index, decays)
    layout = check_fsdp2_layout(engine, opt, state.active_layers) if backend == "fsdp2" else None
    result = {"layout": layout, "backend": state.backend, "lrs": lrs, "switch_index": state.switch_index,
              "ranks_identical": ranks_equal(flat(model) if plugin is None or backend == "zero2"
                                             else torch.zeros(1))}
    assert result["ranks_identical"]
    return result


def hand_loop_resume(backend: str, out: Path) -> Dict:
    """accelerator.save_state / load_state around lisa_dist.integrations.accelerate.prepare under FSDP2 (the
    optimizer goes through lisa_dist's routed save_fsdp_optimizer): resuming mid-interval (step 3,
    K=2) and right after a switch (step 4) ends bit for bit where the straight run ends."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin

    from lisa_dist.integrations.accelerate import prepare

    lisa, steps = LisaConfig(activated_layers=2, interval_steps=2, seed=9), 6

    def build():
        AcceleratorState._reset_state(reset_partial_state=True)
        model = build_model()
        names = decay_parameter_names(model)
        opt = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if n in names],
                                  "weight_decay": WD},
                                 {"params": [p for n, p in model.named_parameters() if n not in names],
                                  "weight_decay": 0.0}], lr=LR)
        acc = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        loader = torch.utils.data.DataLoader(Tokens(), batch_size=MB)
        return (acc, *prepare(acc, model, opt, loader, sched, lisa=lisa))

    def train(acc, model, opt, loader, sched, start: int, save_at=()):
        for step, batch in zip(range(start, steps), acc.skip_first_batches(loader, start) if start else loader):
            acc.backward(model(**batch).loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            if step + 1 in save_at:
                acc.save_state(str(out / "acc_state" / f"step{step + 1}"))
        return flat(model)

    final = train(*build(), start=0, save_at=(3, 4))
    resumed = {}
    for at in (3, 4):
        acc, model, opt, loader, sched = build()
        acc.load_state(str(out / "acc_state" / f"step{at}"))
        w = train(acc, model, opt, loader, sched, start=at)
        resumed[str(at)] = {"bit_identical": bool(torch.equal(w, final)),
                            "max_abs_diff": (w - final).abs().max().item()}
        assert resumed[str(at)]["bit_identical"], (at, resumed[str(at)])
        del acc, model, opt, loader, sched
    AcceleratorState._reset_state(reset_partial_state=True)
    return {"resume": resumed, "optimizer_dirs": sorted(p.name for p in (out / "acc_state" / "step3").iterdir())}


def ds_sections(backend: str, out: Path) -> Dict:
    """The optimizer and a WarmupLR scheduler in the DeepSpeed config (accelerate's DummyOptim /
    DummyScheduler): one hyper-parameter set, DeepSpeed steps the schedule, LISA keeps it."""
    from deepspeed.runtime import lr_schedules

    cfg = ds_config(int(backend[-1]))
    warmup = {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 4, "warmup_type": "linear"}
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                    "eps": "auto", "torch_adam": True}}
    cfg["scheduler"] = {"type": "WarmupLR", "params": warmup}
    model = build_model()
    cb = LisaCallback(LisaConfig(activated_layers=2, interval_steps=1, seed=2))
    probe = Probe(cb, model, decay_parameter_names(model), expect_decay_split=False)
    steps = 5
    trainer = Trainer(model=model, args=training_args(out / "sections", backend, steps, deepspeed=cfg, warmup_steps=4),
                      train_dataset=Tokens(), callbacks=[cb, probe])
    trainer.train()
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    replica = lr_schedules.WarmupLR(dummy, **warmup)
    dummy.step()
    expected = []
    for _ in range(steps):
        replica.step()
        expected.append(dummy.param_groups[0]["lr"])
    got = [g[0] for g in probe.lrs]
    assert all(abs(a - b) <= 1e-12 for a, b in zip(got, expected)), (got, expected)
    assert cb.switch_index == steps and probe.frozen_checks == steps * 4, (cb.switch_index, probe.frozen_checks)
    stepped = sum(1 for lr in probe.lrs_before if lr > 0)
    assert stepped >= 3 and probe.moved_checks == stepped * 2, (probe.lrs_before, probe.moved_checks)
    return {"lrs": probe.lrs, "expected": expected, "frozen_checks": probe.frozen_checks,
            "moved_checks": probe.moved_checks, "steps_with_lr": stepped}


def held_out_set() -> Tokens:
    """Fixed random sequences of another seed, none of them the training set's rows; every row has
    SEQ - 1 label tokens, so Trainer's mean of batch means is the token-weighted mean."""
    return Tokens(12, seed=7)


class EvalRecorder(TrainerCallback):
    """Every evaluation's eval_loss with the whole weights at that moment (a collective: every rank
    gets on_evaluate)."""

    def __init__(self):
        self.trainer = None
        self.seen: List = []

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.seen.append((state.global_step, metrics["eval_loss"], full_weights(self.trainer)))


def held_out_loss(weights: torch.Tensor, held_out: Tokens) -> float:
    """The held-out loss of these weights in one process, outside Trainer: a plain model, one batch."""
    model = build_model()
    torch.nn.utils.vector_to_parameters(weights.float(), model.parameters())
    model.eval()
    with torch.no_grad():
        return model(input_ids=held_out.rows, labels=held_out.rows).loss.item()


def evaluation(backend: str, out: Path) -> Dict:
    """eval_on_start and eval_strategy="steps" during train() and trainer.evaluate() after it, with
    LisaCallback: each eval_loss Trainer reports equals the loss computed independently on the weights
    of that moment (ZeRO-3 and FSDP2 gather for the forward, the ranks share the held-out rows), and
    evaluating leaves training exact (weights still LisaOptimizer's, frozen layers untouched, every step)."""
    lisa = LisaConfig(activated_layers=2, interval_steps=2, seed=3)
    steps = 4
    start = build_model()
    model = copy.deepcopy(start)
    data, held_out = Tokens(), held_out_set()
    cb, recorder = LisaCallback(lisa), EvalRecorder()
    probe = Probe(cb, model, decay_parameter_names(model))
    trainer = Trainer(model=model, args=training_args(out / "eval", backend, steps, eval_strategy="steps", eval_steps=2,
                                                      eval_on_start=True, per_device_eval_batch_size=2),
                      train_dataset=data, eval_dataset=held_out, callbacks=[cb, probe, recorder])
    recorder.trainer = trainer
    trainer.train()
    trainer.evaluate()
    evals = [{"step": step, "eval_loss": loss, "independent": held_out_loss(w, held_out)}
             for step, loss, w in recorder.seen]
    for e in evals:
        e["abs_diff"] = abs(e["eval_loss"] - e["independent"])
    result = {"evals": evals, "frozen_checks": probe.frozen_checks, "moved_checks": probe.moved_checks,
              "logged": [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]}
    assert [e["step"] for e in evals] == [0, 2, 4, 4], evals
    assert all(e["abs_diff"] <= 1e-5 for e in evals), evals
    assert probe.frozen_checks == steps * 4 and probe.moved_checks == steps * 2, result
    final = full_weights(trainer)
    ref = reference(start, lisa, decay_parameter_names(start), gather_reads(data.read), data, steps)
    result["ref_max_abs_diff"] = (final - ref).abs().max().item()
    assert result["ref_max_abs_diff"] <= 5e-5, result["ref_max_abs_diff"]
    del trainer, cb, probe, recorder
    return result


def evaluate_first(backend: str, out: Path) -> Dict:
    """trainer.evaluate() before train(): accelerate would prepare the model for evaluation alone (FSDP2:
    its own sharding; ZeRO-3: an inference engine train() keeps; DDP: marked prepared, never wrapped),
    so LISA refuses with the fix (eval_on_start=True); one device evaluates and trains as usual."""
    model = build_model()
    held_out = held_out_set()
    cb = LisaCallback(LisaConfig(activated_layers=2, interval_steps=2, seed=3))
    trainer = Trainer(model=model, args=training_args(out / "evaluate_first", backend, 2, per_device_eval_batch_size=2),
                      train_dataset=Tokens(), eval_dataset=held_out, callbacks=[cb])
    result: Dict = {}
    try:
        metrics = trainer.evaluate()
        result["eval_loss"] = metrics["eval_loss"]
        result["independent"] = held_out_loss(full_weights(trainer), held_out)
        trainer.train()
        result["trained_with"] = cb.backend
    except ValueError as e:
        result["error"] = str(e)
    if backend == "single":
        assert result.get("trained_with") == "single", result
        assert abs(result["eval_loss"] - result["independent"]) <= 1e-5, result
    elif backend in ("zero1", "zero2"):  # transformers' own refusal, before anything is prepared
        assert "ZeRO inference only makes sense with ZeRO Stage 3" in result.get("error", ""), result
    else:
        assert "eval_on_start=True" in result.get("error", "") and cb.backend is None, result
    del trainer, cb
    return result


SCENARIOS = {"main": main_run, "sft": sft, "late": late_callback, "accelerate": hand_loop, "ds_sections": ds_sections,
             "bf16": bf16_weights, "fsdp_refusals": fsdp_refusals, "accelerate_resume": hand_loop_resume,
             "evaluation": evaluation, "evaluate_first": evaluate_first}
ONLY_FOR = {"ds_sections": ("zero1", "zero2", "zero3"), "bf16": ("fsdp2",), "fsdp_refusals": ("fsdp2",),
            "accelerate_resume": ("fsdp2",)}


def main() -> None:
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints where a hung rank is
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True, choices=["single", "ddp", "zero1", "zero2", "zero3", "fsdp2"])
    parser.add_argument("--ds-config-from-launcher", action="store_true",
                        help="accelerate launch --use_deepspeed supplies the DeepSpeed config")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    global DS_FROM_LAUNCHER
    DS_FROM_LAUNCHER = args.ds_config_from_launcher
    # No init_process_group here: Trainer's accelerate state (or DeepSpeed's init_distributed under
    # it) sets the process group up from the launcher's environment, as in a user's script.
    if args.backend == "fsdp2":
        let_accelerate_shard_on_cpu()
    names = [n for n in args.only.split(",") if n] or [
        n for n in SCENARIOS if args.backend in ONLY_FOR.get(n, (args.backend,))]
    results = {}
    import time
    for name in names:
        t0 = time.perf_counter()
        results[name] = SCENARIOS[name](args.backend, args.out)
        results[name]["seconds"] = time.perf_counter() - t0
        if rank() == 0:
            print(f"[hf_checks {args.backend}] {name}: {results[name]['seconds']:.1f}s", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank{rank()}.json").write_text(json.dumps(results, indent=1, default=str))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
