"""The package's imports point one way (core <- backends <- integrations <- recipe) and form no cycle.

Every import counts, including those inside functions (a lazy import is still a dependency); only
a package `__init__` exposing its own submodules lazily is exempt. The checker is tested on a small
planted package too, so a broken checker cannot pass silently.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("core", "backends", "integrations", "recipe")
"""Bottom to top. A module's layer is its folder: lisa_dist/backends/, lisa_dist/integrations/ and
lisa_dist/recipe/ (and their subfolders) are those layers, everything else in lisa_dist/ is core,
except facades: top-level modules that only re-export one layer's API under its public name
(`lisa_dist.deepspeed`, `lisa_dist.hf`, `python -m lisa_dist.train`), which take that layer."""


def facade_layer(path: Path) -> Optional[str]:
    """The layer a thin top-level module re-exports, or None when it is not such a facade: its body is a
    docstring, imports from one layer folder (plus `import sys`), `__all__`, and at most a __main__ guard."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    layers = set()
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lisa_dist."):
            layers.add(node.module.split(".")[1])
            continue
        if isinstance(node, ast.Import) and [a.name for a in node.names] == ["sys"]:
            continue
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            continue
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue
        return None
    if len(layers) == 1 and next(iter(layers)) in LAYERS[1:]:
        return next(iter(layers))
    return None


def layer_of(module: str, package_dir: Path = ROOT / "lisa_dist") -> str:
    """The layer of a lisa_dist module name, from its folder (or, for a facade, from what it re-exports)."""
    parts = module.split(".")[1:]
    if parts and parts[0] in LAYERS[1:]:
        return parts[0]
    if len(parts) == 1 and (package_dir / f"{parts[0]}.py").is_file():
        return facade_layer(package_dir / f"{parts[0]}.py") or "core"
    return "core"


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


def test_layer_folders_and_facades():
    """The folders are the layers; the public names the README shows are facades of the right layer."""
    package = ROOT / "lisa_dist"
    assert {d.name for d in package.iterdir() if d.is_dir() and (d / "__init__.py").is_file()} == set(LAYERS[1:])
    facades = {f"lisa_dist.{f.stem}": facade_layer(f) for f in package.glob("*.py") if facade_layer(f)}
    assert facades == {"lisa_dist.deepspeed": "backends", "lisa_dist.fsdp": "backends", "lisa_dist.hf": "integrations",
                       "lisa_dist.accelerate": "integrations", "lisa_dist.train": "recipe"}, facades
    # anything else at the top level is core, and may not import a layer above it (checked above)
    assert layer_of("lisa_dist.optim") == "core" and layer_of("lisa_dist.backends.fsdp.shard") == "backends"


def test_facade_detection_refuses_code(tmp_path):
    thin = tmp_path / "thin.py"
    thin.write_text('"""doc"""\nfrom lisa_dist.recipe.train import main\n__all__ = ["main"]\n')
    assert facade_layer(thin) == "recipe"
    thick = tmp_path / "thick.py"
    thick.write_text('from lisa_dist.recipe.train import main\ndef run():\n    return main()\n')
    assert facade_layer(thick) is None
    mixed = tmp_path / "mixed.py"
    mixed.write_text("from lisa_dist.recipe.train import main\nfrom lisa_dist.backends.single import SingleRunner\n")
    assert facade_layer(mixed) is None


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

    from lisa_dist import LisaConfig
    from lisa_dist.backends.deepspeed.runner import DeepSpeedRunner
    from lisa_dist.backends.fsdp.runner import FSDPRunner
    from lisa_dist.backends.single import SingleRunner
    from lisa_dist.protocol import Runner
    from lisa_dist.recipe import presets

    members = [m for m in dir(Runner) if not m.startswith("_")] + list(Runner.__annotations__)
    for cls in (SingleRunner, DeepSpeedRunner, FSDPRunner):
        # rank and world_size are set per instance by the distributed runners.
        missing = [m for m in members if m not in Runner.__annotations__ and not hasattr(cls, m)]
        assert not missing, f"{cls.__name__} lacks {missing}"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(presets.PRESETS["tiny-llama"](presets.default_tokenizer()))
    assert isinstance(SingleRunner(model, LisaConfig(), lr=1e-3), Runner)
