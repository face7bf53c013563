"""RunConfig is the one source of lisa-train's flags, --config keys, help texts and validation."""
from __future__ import annotations

import dataclasses
import json

import pytest

from lisa_dist.recipe.run_config import RunConfig, build_parser, field_docs, parse_args


def test_every_field_has_a_docstring_and_a_flag():
    docs = field_docs()
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    for f in dataclasses.fields(RunConfig):
        assert docs.get(f.name), f"RunConfig.{f.name} has no docstring"
        if f.init:
            assert f.name in dests, f"RunConfig.{f.name} has no flag"
    help_text = " ".join(parser.format_help().split())
    for name in ("lr", "resume", "dry_run", "state_policy"):
        assert docs[name][:40] in help_text


def test_flags_file_and_defaults_meet_in_one_typed_object(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 2.0e-4\nactivated-layers: 3\nno_train_head: true\nbackend: deepspeed\n"
                   "deepspeed: ds_configs/zero2.json\n")
    run = parse_args(["--config", str(cfg), "--activated-layers", "4"])
    assert isinstance(run, RunConfig)
    assert (run.lr, run.activated_layers, run.no_train_head) == (2.0e-4, 4, True)
    assert run.lisa.activated_layers == 4 and run.lisa.train_head is False
    assert run == RunConfig(lr=2.0e-4, activated_layers=4, no_train_head=True, backend="deepspeed",
                            deepspeed="ds_configs/zero2.json")


@pytest.mark.parametrize("text, message", [
    ({"steps": "ten"}, "--steps: invalid int value: 'ten'"),
    ({"steps": 2.5}, "--steps must be an int, got 2.5"),
    ({"no_save": "yes"}, "--no-save must be a bool"),
    ({"backend": "tpu"}, "--backend must be one of single, deepspeed, fsdp2"),
    ({"steps": 5, "learning_rate": 1}, "unknown key 'learning_rate'"),
])
def test_config_file_errors_name_the_key(tmp_path, capsys, text, message):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(text))
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(cfg)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_python_api_validates_too():
    with pytest.raises(ValueError, match="--grad-accum must be >= 1"):
        RunConfig(grad_accum=0)
    with pytest.raises(ValueError, match="activated_layers"):
        RunConfig(activated_layers=0)
