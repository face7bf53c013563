"""The package's imports point one way (core <- backends <- integrations <- recipe) and form no cycle.

Every import counts, including those inside functions (a lazy import is still a dependency); only
a package `__init__` exposing its own submodules lazily is exempt. The checker is tested on a small
planted package too, so a broken checker cannot pass silently.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "backends", "integrations", "recipe")
CORE = {"config", "layers", "sampling", "optim", "memory", "serialization", "protocol", "devices", "importance",
        "outlier"}
RECIPE = {"train", "run_config", "modeling", "ds_config", "data", "presets", "checkpoint", "export", "plan",
          "reporting", "plots"}


def layer_of(module: str) -> str:
    """The layer of a lisa_dist module name; a module nobody placed is an error, so new files get placed."""
    parts = module.split(".")[1:]
    if not parts:
        return "core"  # lisa_dist/__init__.py re-exports the core API
    head = parts[0]
    if head in CORE:
        return "core"
    if head in ("single", "deepspeed", "fsdp", "ddp"):
        return "backends"
    if head in ("hf", "accelerate", "integrations") or head.startswith("hf_"):
        return "integrations"
    if head in RECIPE or head == "assets":
        return "recipe"
    raise AssertionError(f"{module}: not placed in a layer; add it to tests/test_layering.py")


def _modules(package_dir: Path) -> Dict[str, Path]:
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(package_dir: Path) -> List[Tuple[str, str, int, bool]]:
    """(importer, imported module, line, lazy-in-package-init) for every import of the package's own modules."""
    name = package_dir.name
    modules = _modules(package_dir)
    edges = []
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                # `from pkg import sub` depends on the submodule when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target == name or target.startswith(name + "."):
                    while target not in modules:  # `import a.b.c` of a non-module attribute path
                        target = target.rsplit(".", 1)[0]
                    lazy = is_package and id(node) not in top_level and target.startswith(module + ".")
                    edges.append((module, target, node.lineno, lazy))
    return edges


def violations(package_dir: Path, layer=layer_of) -> List[str]:
    out = []
    for src, dst, line, _ in import_edges(package_dir):
        if LAYERS.index(layer(dst)) > LAYERS.index(layer(src)):
            out.append(f"{src} (line {line}, {layer(src)}) imports {dst} ({layer(dst)})")
    return out


def cycles(package_dir: Path) -> List[List[str]]:
    graph: Dict[str, Set[str]] = {}
    for src, dst, _, lazy in import_edges(package_dir):
        if not lazy and src != dst:
            graph.setdefault(src, set()).add(dst)
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_dependencies_point_one_way():
    assert violations(ROOT / "lisa_dist") == []


def test_no_import_cycles():
    assert cycles(ROOT / "lisa_dist") == []


def test_every_module_is_placed():
    for module in _modules(ROOT / "lisa_dist"):
        layer_of(module)


def test_checker_finds_planted_violations(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "backend").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text("def f():\n    from .recipe import main\n")  # lazy, still upward
    (pkg / "recipe.py").write_text("from . import core\nmain = 1\n")
    (pkg / "backend" / "__init__.py").write_text("def __getattr__(n):\n    from .a import x\n    return x\n")
    (pkg / "backend" / "a.py").write_text("from .b import y\nx = 1\n")
    (pkg / "backend" / "b.py").write_text("def g():\n    from pkg.backend.a import x\ny = 2\n")

    def layer(module: str) -> str:
        return {"pkg.recipe": "recipe", "pkg.core": "core", "pkg": "core"}.get(module, "backends")

    assert violations(pkg, layer) == ["pkg.core (line 2, core) imports pkg.recipe (recipe)"]
    assert sorted(map(tuple, cycles(pkg))) == [("pkg.backend.a", "pkg.backend.b", "pkg.backend.a"),
                                               ("pkg.core", "pkg.recipe", "pkg.core")]


def test_every_runner_implements_the_protocol():
    import torch
    import transformers

    from lisa_dist import LisaConfig, presets
    from lisa_dist.deepspeed.runner import DeepSpeedRunner
    from lisa_dist.fsdp.runner import FSDPRunner
    from lisa_dist.protocol import Runner
    from lisa_dist.single import SingleRunner

    members = [m for m in dir(Runner) if not m.startswith("_")] + list(Runner.__annotations__)
    for cls in (SingleRunner, DeepSpeedRunner, FSDPRunner):
        # rank and world_size are set per instance by the distributed runners.
        missing = [m for m in members if m not in Runner.__annotations__ and not hasattr(cls, m)]
        assert not missing, f"{cls.__name__} lacks {missing}"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(presets.PRESETS["tiny-llama"](presets.default_tokenizer()))
    assert isinstance(SingleRunner(model, LisaConfig(), lr=1e-3), Runner)
