"""The version policy (lisa_dist/versions.py): one table of tested releases read by setup.py, the
adapters, the pinned CI set and the docs; silent inside it, one warning per library outside it,
refusal only when a probe of a private API fails or under LISA_DIST_STRICT_VERSIONS=1."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest
from version_checks import forget_version_checks

from lisa_dist import versions
from lisa_dist.versions import (
    LIBRARIES,
    MATRIX,
    IncompatibleReleaseError,
    Probe,
    UntestedReleaseWarning,
    check_release,
    in_tested_range,
    require,
    require_attrs,
)

ROOT = Path(__file__).resolve().parents[2]
PINNED = ROOT / "constraints" / "tested.txt"


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    monkeypatch.delenv(versions.STRICT_ENV, raising=False)
    forget_version_checks()
    yield
    forget_version_checks()


def _pins(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", line.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_release_ranges_are_ordered_and_hold_their_newest():
    for lib in LIBRARIES.values():
        for lo, hi in lib.tested:
            assert versions.release_tuple(lo) < versions.release_tuple(hi), lib.name
        assert in_tested_range(lib.name, lib.newest), f"{lib.name} {lib.newest} outside {lib.tested}"


def test_pinned_set_and_matrix_pins_lie_inside_the_tested_ranges():
    pins = _pins(PINNED)
    for name in LIBRARIES:
        assert name in pins, f"{PINNED.name} pins no {name}"
        assert in_tested_range(name, pins[name]), f"{PINNED.name} pins {name}=={pins[name]}, outside the tested ranges"
    for leg, spec in MATRIX.items():
        for name, release in spec["pins"].items():
            assert in_tested_range(name, release), f"matrix leg {leg} pins {name}=={release} outside the tested ranges"


def test_setup_py_declares_what_versions_py_says():
    """The installed distribution's requirements are the table's: floors and known-broken releases
    only, never an upper bound."""
    requires = metadata.requires("lisa_dist") or []
    for lib in LIBRARIES.values():
        declared = [r for r in requires if re.match(rf"^{lib.name}\b", r)]
        assert declared, f"setup.py does not declare {lib.name}"
        for r in declared:
            spec = r.split(";")[0].replace(" ", "")
            assert spec.replace("(", "").replace(")", "") == lib.requirement(), (r, lib.requirement())
            assert "<" not in spec, f"{r}: an upper bound"
    assert any(r.startswith("peft") and "extra == \"test\"" in r for r in requires), "peft in no test extra"


def test_inside_the_range_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for lib in LIBRARIES.values():
            check_release(lib.name, lib.newest)


@pytest.mark.parametrize("library,release,side", [("transformers", "5.99.0", "newer"),
                                                  ("accelerate", "1.99.0", "newer"),
                                                  ("torch", "2.10.1+cu128", "older"), ("deepspeed", "0.18.3", "older"),
                                                  ("deepspeed", "0.20.0", "newer")])
def test_outside_the_range_warns_once_and_goes_on(library, release, side):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_release(library, release)
        check_release(library, release)
    untested = [w for w in caught if issubclass(w.category, UntestedReleaseWarning)]
    assert len(untested) == 1, [str(w.message) for w in caught]
    message = str(untested[0].message)
    assert f"{library} {release} is {side} than" in message
    assert versions.describe_ranges(library) in message
    assert "python -m lisa_dist.versions" in message and "LISA_DIST_STRICT_VERSIONS=1" in message


def test_strict_mode_refuses_untested_releases(monkeypatch):
    monkeypatch.setenv(versions.STRICT_ENV, "1")
    check_release("transformers", LIBRARIES["transformers"].newest)
    with pytest.raises(IncompatibleReleaseError,
                       match=r"transformers 5\.99\.0 .*LISA_DIST_STRICT_VERSIONS=1 refuses it"):
        check_release("transformers", "5.99.0")


def test_a_failing_probe_names_what_is_missing_and_the_last_release_that_had_it():
    class Engine:
        present = 1

    probes = [Probe("deepspeed.Engine.present", lambda: hasattr(Engine, "present")),
              Probe("deepspeed.Engine._gone", lambda: Engine._gone, last_seen="0.19.8")]
    with pytest.raises(IncompatibleReleaseError) as err:
        require("deepspeed", "planted", probes)
    message = str(err.value)
    assert "deepspeed.Engine._gone (last seen in deepspeed 0.19.8)" in message
    assert "deepspeed.Engine.present" not in message
    assert "pip install 'deepspeed==0.19.8'" in message
    require("deepspeed", "planted-ok", probes[:1])  # passes, and is not run again
    with pytest.raises(IncompatibleReleaseError, match=r"Engine\.missing_attr \(last seen in deepspeed"):
        require_attrs("deepspeed", Engine(), "Engine", ["present", "missing_attr"])


def test_report_lists_every_library():
    out = subprocess.run([sys.executable, "-m", "lisa_dist.versions"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in LIBRARIES:
        assert re.search(rf"^{name}\s", out.stdout, re.M), out.stdout


def _shadow_release(package: str, version: str, into: Path) -> None:
    """A copy of an installed package that calls itself `version`: its __init__.py rewritten, every
    other entry a symlink to the installed one (what a user gets from tomorrow's release, as far as
    any version check can tell)."""
    import importlib.util
    source = Path(importlib.util.find_spec(package).origin).parent
    target = into / package
    target.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "__init__.py":
            (target / entry.name).symlink_to(entry)
    text = (source / "__init__.py").read_text()
    patched, n = re.subn(r'^__version__\s*=\s*"[^"]+"', f'__version__ = "{version}"', text, flags=re.M)
    assert n == 1, f"{package}/__init__.py sets no __version__"
    (target / "__init__.py").write_text(patched)


def test_a_newer_transformers_and_accelerate_warn_and_train(tmp_path):
    """What a user on tomorrow's releases gets: transformers and accelerate that call themselves 5.99.0
    and 1.99.0 warn once each, then a Trainer with LisaCallback trains, and with one active layer
    and no switch exactly one decoder layer moves."""
    shadow = tmp_path / "site"
    _shadow_release("transformers", "5.99.0", shadow)
    _shadow_release("accelerate", "1.99.0", shadow)
    script = tmp_path / "newer.py"
    script.write_text(textwrap.dedent("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import torch
            import transformers, accelerate
            assert (transformers.__version__, accelerate.__version__) == ("5.99.0", "1.99.0")
            from datasets import Dataset
            from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
            from lisa_dist import LisaConfig
            from lisa_dist.integrations.hf import LisaCallback
            callback = LisaCallback(LisaConfig(activated_layers=1, interval_steps=100, seed=3))
            LisaCallback(LisaConfig(activated_layers=1, interval_steps=100, seed=3))  # no second warning
        untested = sorted(str(w.message).split(" is ")[0] for w in caught if "UntestedRelease" in repr(w.category))
        assert untested == ["lisa_dist: accelerate 1.99.0", "lisa_dist: transformers 5.99.0"], untested

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                             num_attention_heads=4, num_key_value_heads=2))
        before = [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in model.model.layers]
        ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(1))
        data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
        args = TrainingArguments(output_dir=%r, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                                 report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
        Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
        moved = [i for i, layer in enumerate(model.model.layers)
                 if any(not torch.equal(p, before[i][n]) for n, p in layer.named_parameters())]
        assert moved == list(callback.active_layers) and len(moved) == 1, (moved, callback.active_layers)
        print("TRAINED", moved)
    """ % str(tmp_path / "out")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "TRAINED" in out.stdout, (out.stdout + out.stderr)[-4000:]


def _leg(name, resolved, checks):
    return {"leg": name, "date": "2026-12-07", "python": "3.11.7", "resolved": resolved,
            "checks": {c: {"passed": ok, "summary": f"{n} passed in 1.0s"} for c, (ok, n) in checks.items()}}


def test_support_table_renders_what_the_legs_wrote():
    newest = {name: lib.newest for name, lib in LIBRARIES.items()}
    table = versions.support_table([
        _leg("good", newest, {"hf": (True, 3), "zero": (True, 4)}),
        _leg("bad", dict(newest, transformers="5.99.0", peft=None), {"fsdp2": (False, 1)}),
    ])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| `")}
    head = [c.strip() for c in next(line for line in table.splitlines() if line.startswith("| leg")).split("|")[1:-1]]
    good, bad = dict(zip(head[1:], rows["`good`"])), dict(zip(head[1:], rows["`bad`"]))
    assert good["Trainer / accelerate"] == "passed (3 passed)" and good["FSDP2"] == "-"
    assert bad["FSDP2"] == "**FAILED** (1 passed)"
    assert bad["transformers"] == "5.99.0 (warns)" and bad["peft"] == "-"
    assert good["transformers"] == newest["transformers"]


def test_supported_releases_page_is_the_rendering_of_the_committed_results():
    """docs/supported-releases.md is generated from benchmarks/results/matrix/*.json, never edited by hand."""
    import json
    results = sorted((ROOT / "benchmarks" / "results" / "matrix").glob("*.json"))
    assert results, "no release-matrix results committed"
    page = (ROOT / "docs" / "supported-releases.md").read_text()
    assert page == versions.support_table([json.loads(p.read_text()) for p in results]), (
        "docs/supported-releases.md differs from its rendering: python -m lisa_dist.versions --support-table "
        "benchmarks/results/matrix/*.json > docs/supported-releases.md")
