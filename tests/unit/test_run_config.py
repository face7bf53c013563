"""RunConfig is the one source of lisa-train's flags, --config keys, help texts and validation."""
from __future__ import annotations

import dataclasses
import json

import pytest

from lisa_dist.config import LisaConfig
from lisa_dist.recipe.run_config import RunConfig, build_parser, field_docs, parse_args


def test_every_field_has_a_docstring_and_a_flag():
    docs = field_docs()
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    for f in dataclasses.fields(RunConfig):
        assert docs.get(f.name), f"RunConfig.{f.name} has no docstring"
        if f.init and f.name != "lisa":  # lisa: one flag per LisaConfig field, below
            assert f.name in dests, f"RunConfig.{f.name} has no flag"
    help_text = " ".join(parser.format_help().split())
    for name in ("lr", "resume", "dry_run"):
        assert docs[name][:40] in help_text
    assert field_docs(LisaConfig)["state_policy"][:40] in help_text


def test_every_lisa_config_field_has_a_flag_with_its_docstring_as_help():
    """The LISA group is generated from LisaConfig: a new field gets its flag, and fails here without a docstring."""
    docs = field_docs(LisaConfig)
    actions = {a.dest: a for a in build_parser()._actions}
    for f in dataclasses.fields(LisaConfig):
        assert docs.get(f.name), f"LisaConfig.{f.name} has no docstring (it is the flag's help)"
        action = actions.get(f.name)
        assert action is not None, f"LisaConfig.{f.name} has no lisa-train flag"
        assert "--" + f.name.replace("_", "-") in action.option_strings
        assert action.help.replace("%%", "%").startswith(docs[f.name]), (f.name, action.help)
        assert action.default == f.default
    assert "the data order" in actions["seed"].help  # what lisa-train adds to the docstring


def test_todays_lisa_flags_keep_working():
    run = parse_args(["--activated-layers", "3", "--interval-steps", "5", "--seed", "7", "--state-policy", "offload",
                      "--layers-path", "model.layers", "--no-train-embeddings", "--no-train-head",
                      "--sampling", "weighted", "--layer-weights", "1,1,2"])
    assert run.lisa == LisaConfig(activated_layers=3, interval_steps=5, seed=7, state_policy="offload",
                                  layers_path="model.layers", train_embeddings=False, train_head=False,
                                  sampling="weighted", layer_weights=(1.0, 1.0, 2.0))
    # booleans that default to True have both switches; the last one given wins
    assert parse_args(["--no-train-head", "--train-head"]).lisa.train_head is True
    assert parse_args([]).lisa == LisaConfig()


def test_lisa_fields_without_a_hand_written_flag_before():
    run = parse_args(["--sampling", "gradient", "--gradient-eta", "2", "--gradient-beta", "0.5", "--exploration",
                      "0.2", "--outlier-threshold", "9", "--calibration-batches", "2"])
    assert (run.lisa.gradient_eta, run.lisa.gradient_beta, run.lisa.exploration) == (2.0, 0.5, 0.2)
    assert (run.lisa.outlier_threshold, run.lisa.calibration_batches) == (9.0, 2)


def test_flags_file_and_defaults_meet_in_one_typed_object(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 2.0e-4\nactivated-layers: 3\nno_train_head: true\nbackend: deepspeed\n"
                   "deepspeed: ds_configs/zero2.json\nlayer_weights: [1, 2, 3, 4]\nsampling: weighted\n")
    run = parse_args(["--config", str(cfg), "--activated-layers", "4"])
    assert isinstance(run, RunConfig)
    assert run.lr == 2.0e-4 and run.lisa.activated_layers == 4 and run.lisa.train_head is False
    assert run == RunConfig(lr=2.0e-4, backend="deepspeed", deepspeed="ds_configs/zero2.json",
                            lisa=LisaConfig(activated_layers=4, train_head=False, sampling="weighted",
                                            layer_weights=(1, 2, 3, 4)))


def test_config_file_takes_lisa_config_names_too(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"train_embeddings": False, "gradient_eta": 3, "sampling": "gradient",
                               "layer-weights": None}))
    lisa = parse_args(["--config", str(cfg)]).lisa
    assert lisa.train_embeddings is False and lisa.gradient_eta == 3.0 and lisa.sampling == "gradient"
    assert parse_args(["--config", str(cfg), "--train-embeddings"]).lisa.train_embeddings is True


@pytest.mark.parametrize("text, message", [
    ({"steps": "ten"}, "--steps: invalid int value: 'ten'"),
    ({"steps": 2.5}, "--steps must be an int, got 2.5"),
    ({"no_save": "yes"}, "--no-save must be a bool"),
    ({"backend": "tpu"}, "--backend must be one of single, deepspeed, fsdp2"),
    ({"steps": 5, "learning_rate": 1}, "unknown key 'learning_rate'"),
    ({"activated_layers": "two"}, "--activated-layers: invalid int value: 'two'"),
    ({"activated_layers": 2.5}, "--activated-layers must be an int, got 2.5"),
    ({"activated_layers": 0}, "--activated-layers (gamma) must be >= 1, got 0"),
    ({"no_train_head": "yes"}, "--no-train-head must be a bool"),
    ({"train_head": 1}, "--train-head must be a bool"),
    ({"sampling": "random"}, "--sampling must be one of uniform, weighted, outlier, gradient"),
    ({"sampling": "weighted", "layer_weights": "1,x"}, "--layer-weights: '1,x': expected comma-separated numbers"),
    ({"gradient_beta": 1}, "--gradient-beta must be in [0, 1), got 1.0"),
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
        RunConfig(lisa=LisaConfig(activated_layers=0))
    with pytest.raises(ValueError, match="RunConfig.lisa must be a LisaConfig"):
        RunConfig(lisa={"activated_layers": 2})
