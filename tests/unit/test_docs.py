"""The documentation points into this repository and says nothing the code cannot back.

Fails on:
- a relative link in any tracked .md file whose target does not exist, or whose `#anchor` is not a
  heading of the target .md file (GitHub's anchors: lower case, punctuation dropped, spaces to dashes);
- a repository path in README.md, docs/ or another README (prose, inline code or code blocks) that does
  not exist; a path is a word starting with one of PATH_ROOTS followed by `/`, with `*` globs and
  `{a,b}` alternatives allowed;
- a `docs/<page>.md#<anchor>` citation anywhere in the repository (code, comments, scripts) that does
  not resolve: code cites docs/design.md by anchor, so its headings must stay;
- any mention of the brief's design file (the DESIGN constant below) in a tracked file: it is not in
  the repository; cite docs/design.md#<anchor> instead;
- README.md over 300 lines;
- an import or `lisa_dist.x.y` reference in README.md's code blocks, or a dotted `lisa_dist.x.y` name in
  the docs, that does not import / resolve (checked in a subprocess with this checkout on PYTHONPATH),
  and a `lisa-*` command in README.md's code blocks that setup.py does not declare;
- a docs page missing from docs/README.md's index, a benchmark script or result file missing from
  benchmarks/README.md, a test tier missing from tests/README.md.

The checkers are tested on a small planted repository too, so a broken checker cannot pass silently.
"""
from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
THIS = "tests/unit/test_docs.py"
DESIGN = "DESIGN" + ".md"  # spelled apart so this file does not mention it
README_MAX_LINES = 300
PATH_ROOTS = ("lisa_dist", "benchmarks", "tests", ".ci", "launch", "ds_configs", "docs", "constraints")
"""Top-level folders of this repository: a word starting with one of these and a slash is a repo path."""

PENDING: Dict[str, str] = {
    "benchmarks/results/gpu": (
        "the default --out of benchmarks/gpu_validate.sh, which the docs name as where GPU results go; no GPU "
        "results committed yet. Remove this entry when they are."),
}
"""Paths the docs name before they exist, and why. Only while a path is missing is it exempt;
test_pending_paths_are_still_missing fails once it exists, so the list cannot go stale."""


# --- the repository's files -----------------------------------------------------------------------

def repo_files(root: Path = ROOT) -> List[str]:
    """Tracked files plus new ones git does not ignore (a commit in progress is checked too)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, text=True, check=True).stdout
    return sorted({line for line in out.splitlines() if line and (root / line).exists()})


def doc_files(files: Iterable[str]) -> List[str]:
    """The user-facing docs whose paths and dotted names are checked: READMEs and docs/."""
    return [f for f in files if f.endswith(".md") and (f.startswith("docs/") or Path(f).name == "README.md")]


# --- markdown --------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```|~~~)")


def split_code(text: str) -> Tuple[List[Tuple[int, str]], List[Tuple[int, str]]]:
    """(prose lines, code-block lines), each as (line number, text)."""
    prose, code, inside = [], [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        (code if inside else prose).append((n, line))
    return prose, code


def code_blocks(text: str) -> List[str]:
    blocks, current, inside = [], [], False
    for line in text.splitlines():
        if FENCE.match(line):
            if inside:
                blocks.append("\n".join(current))
                current = []
            inside = not inside
        elif inside:
            current.append(line)
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links keep their text
    text = text.replace("`", "").replace("*", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set:
    seen: Dict[str, int] = {}
    out = set()
    for _, line in split_code(text)[0]:
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"`[^`]*`")


def links(text: str) -> List[Tuple[int, str]]:
    """(line, target) of every inline link or image outside code."""
    out = []
    for n, line in split_code(text)[0]:
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            out.append((n, m.group(1)))
    return out


def broken_links(root: Path, md_files: Sequence[str]) -> List[str]:
    problems = []
    for rel in md_files:
        text = (root / rel).read_text(encoding="utf-8")
        for n, target in links(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            where = f"{rel}:{n}: link {target!r}"
            if path_part:
                resolved = (root / rel).parent / path_part
                try:
                    inside = resolved.resolve().relative_to(root.resolve()).as_posix()
                except ValueError:
                    problems.append(f"{where} points outside the repository")
                    continue
                if not resolved.exists():
                    if not pending(inside):
                        problems.append(f"{where}: {inside} does not exist")
                    continue
            else:
                resolved = root / rel
            if anchor and resolved.suffix == ".md" and resolved.is_file():
                if anchor not in anchors(resolved.read_text(encoding="utf-8")):
                    problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.relative_to(root)}")
    return problems


# --- repository paths named in the docs ------------------------------------------------------------

PATH = re.compile(r"(?<![\w./~$-])((?:" + "|".join(re.escape(p) for p in PATH_ROOTS) + r")/[\w.*{},/-]*)")


def expand(path: str) -> List[str]:
    """`a/{b,c}.md` -> a/b.md, a/c.md."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in expand(path[:m.start()] + alt + path[m.end():])]


def pending(path: str) -> bool:
    path = path.rstrip("/")
    return any(path == p or path.startswith(p + "/") for p in PENDING)


def path_exists(root: Path, path: str) -> bool:
    path = path.rstrip("/")
    if "*" in path:
        return any(root.glob(path))
    return (root / path).exists()


def named_paths(text: str) -> List[Tuple[int, str]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in PATH.finditer(line):
            word = m.group(1).rstrip(".,")
            for path in expand(word):
                out.append((n, path))
    return out


def missing_paths(root: Path, md_files: Sequence[str]) -> List[str]:
    problems = []
    for rel in md_files:
        for n, path in named_paths((root / rel).read_text(encoding="utf-8")):
            if not path_exists(root, path) and not pending(path):
                problems.append(f"{rel}:{n}: {path} does not exist")
    return problems


# --- citations of docs pages in code --------------------------------------------------------------

CITATION = re.compile(r"(?<![\w/.-])docs/([\w-]+\.md)(?:#([\w-]+))?")


def broken_citations(root: Path, files: Sequence[str]) -> List[str]:
    problems = []
    for rel in files:
        if rel == THIS:  # its planted cases cite pages that do not exist, on purpose
            continue
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for m in CITATION.finditer(line):
                page = f"docs/{m.group(1)}"
                target = root / page
                if not target.is_file():
                    if not pending(page):
                        problems.append(f"{rel}:{n}: cites {page}, which does not exist")
                    continue
                if m.group(2) and m.group(2) not in anchors(target.read_text(encoding="utf-8")):
                    problems.append(f"{rel}:{n}: cites {page}#{m.group(2)}, which has no such heading")
    return problems


def design_mentions(root: Path, files: Sequence[str]) -> List[str]:
    found = []
    for rel in files:
        if rel == THIS:  # it has to name the file it looks for
            continue
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError):
            continue
        found += [f"{rel}:{n}" for n, line in enumerate(text.splitlines(), 1) if DESIGN in line]
    return found


# --- Python names in README.md and the docs --------------------------------------------------------

IMPORT = re.compile(r"^\s*(from\s+lisa_dist[\w.]*\s+import\s+.+|import\s+lisa_dist[\w.]*(?:\s+as\s+\w+)?)\s*(?:#.*)?$")
DOTTED = re.compile(r"(?<![\w.])lisa_dist(?:\.[A-Za-z_]\w*)+")


def readme_code_names(text: str) -> Tuple[List[str], List[str], List[str]]:
    """(import statements, dotted lisa_dist names, lisa-* commands) of the README's code blocks."""
    imports, dotted, commands = [], [], []
    for block in code_blocks(text):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if "(" in line and IMPORT.match(line.split("(")[0] + "x") and ")" not in line:
                while ")" not in line and i + 1 < len(lines):  # a parenthesised multi-line import
                    i += 1
                    line += " " + lines[i].strip()
            m = IMPORT.match(line)
            if m:
                imports.append(m.group(1).strip())
            i += 1
        dotted += DOTTED.findall(block)
        commands += re.findall(r"(?<![\w-])(lisa-[a-z]+)(?![\w-])", block)
    return sorted(set(imports)), sorted(set(dotted)), sorted(set(commands))


RESOLVER = textwrap.dedent("""
    import importlib, json, sys
    imports, dotted = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    failed = {}
    for statement in imports:
        try:
            exec(statement, {})
        except Exception as exc:
            failed[statement] = f"{type(exc).__name__}: {exc}"
    for name in dotted:
        parts = name.split(".")
        obj, error = None, None
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError as exc:
                if exc.name is None or not ".".join(parts[:cut]).startswith(exc.name):
                    error = f"ModuleNotFoundError: {exc}"
                    break
                continue
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                break
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError as exc:
                error = f"AttributeError: {exc}"
            break
        if error is not None or obj is None:
            failed[name] = error or "no importable prefix"
    print(json.dumps(failed))
""")


def unresolved(imports: Sequence[str], dotted: Sequence[str], root: Path = ROOT) -> Dict[str, str]:
    """What fails to import or resolve, run in a fresh interpreter with `root` first on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-c", RESOLVER, json.dumps(list(imports)), json.dumps(list(dotted))],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def console_scripts(setup_py: str) -> Dict[str, str]:
    return dict(re.findall(r"[\"'](lisa-[a-z]+)\s*=\s*([\w.]+:\w+)[\"']", setup_py))


# --- the checks on this repository -----------------------------------------------------------------

@pytest.fixture(scope="module")
def files() -> List[str]:
    return repo_files()


def test_relative_links_resolve(files):
    assert broken_links(ROOT, [f for f in files if f.endswith(".md")]) == []


def test_paths_named_in_the_docs_exist(files):
    assert missing_paths(ROOT, doc_files(files)) == []


def test_docs_citations_resolve(files):
    assert broken_citations(ROOT, files) == []


def test_no_citation_of_the_design_brief_outside_the_repo(files):
    assert design_mentions(ROOT, files) == [], f"cite docs/design.md#<anchor> instead of {DESIGN}"


def test_readme_fits_the_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}); move detail to docs/"


@pytest.fixture(scope="module")
def names(files) -> Dict[str, object]:
    """Every Python name the README and the docs show, resolved in one fresh interpreter."""
    imports, dotted, commands = readme_code_names((ROOT / "README.md").read_text(encoding="utf-8"))
    scripts = console_scripts((ROOT / "setup.py").read_text(encoding="utf-8"))
    targets = sorted({target.replace(":", ".") for target in scripts.values()})
    in_docs = sorted({n for f in doc_files(files) for n in DOTTED.findall((ROOT / f).read_text(encoding="utf-8"))})
    return {"imports": imports, "dotted": dotted, "commands": commands, "scripts": scripts, "targets": targets,
            "in_docs": in_docs, "failed": unresolved(imports, sorted(set(dotted) | set(targets) | set(in_docs)))}


def test_readme_code_imports_and_names_resolve(names):
    imports, dotted, commands, failed = names["imports"], names["dotted"], names["commands"], names["failed"]
    # What the front door promises; if one of these goes, the README changed its promise.
    assert {"from lisa_dist import LisaConfig, LisaOptimizer", "from lisa_dist.hf import LisaCallback",
            "import lisa_dist.deepspeed", "import lisa_dist.accelerate"} <= set(imports), imports
    assert {"lisa_dist.deepspeed.initialize", "lisa_dist.train", "lisa_dist.fsdp"} <= set(dotted), dotted
    assert {"lisa-train"} <= set(commands), commands
    assert {k: v for k, v in failed.items() if k in imports or k in dotted} == {}
    scripts = names["scripts"]
    assert set(commands) <= set(scripts), f"README runs {set(commands) - set(scripts)}, which setup.py does not declare"
    assert {"lisa-train", "lisa-export"} <= set(scripts)
    assert {k: v for k, v in failed.items() if k in names["targets"]} == {}


def test_dotted_names_in_the_docs_resolve(names):
    assert len(names["in_docs"]) > 10, names["in_docs"]
    assert {k: v for k, v in names["failed"].items() if k in names["in_docs"]} == {}


def test_indexes_are_complete(files):
    docs_index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    linked = {target.partition("#")[0] for _, target in links(docs_index)}
    pages = {f[len("docs/"):] for f in files if f.startswith("docs/") and f.endswith(".md") and f != "docs/README.md"}
    assert pages - linked == set(), f"docs/README.md does not link {sorted(pages - linked)}"

    bench_index = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    globs = [p for _, p in named_paths(bench_index) if "*" in p]
    bench = [f for f in files if f.startswith("benchmarks/") and f != "benchmarks/README.md"]
    unlisted = [f for f in bench if f not in bench_index and not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert unlisted == [], f"benchmarks/README.md does not list {unlisted}"

    tiers = ast.literal_eval(re.search(r"^TIERS = (\(.*?\))", (ROOT / "tests" / "conftest.py").read_text(),
                                       re.M | re.S).group(1))
    assert "unit" in tiers, tiers
    tests_index = (ROOT / "tests" / "README.md").read_text(encoding="utf-8")
    assert [t for t in tiers if f"tests/{t}" not in tests_index] == []


def test_pending_paths_are_still_missing():
    arrived = [p for p in PENDING if (ROOT / p).exists()]
    assert arrived == [], f"{arrived} exist now: remove them from PENDING in {THIS}"


# --- the checkers on a planted repository ---------------------------------------------------------

def plant(root: Path, files: Dict[str, str]) -> List[str]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return sorted(files)


def test_link_checker_on_planted_docs(tmp_path):
    files = plant(tmp_path, {
        "README.md": """\
            # Front `door`

            [partial anchor](docs/guide.md#the-2-rank-run) [ok](docs/guide.md#the-2-rank-run-deepspeed)
            [ok dir](tests/) [bad file](docs/nope.md)
            [bad anchor](docs/guide.md#missing) [same file](#front-door) [bad same file](#nowhere)
            [web](https://example.com/x.md) `[in code](docs/nope.md)` [escape](../outside.md)
            ```
            [in a block](docs/nope.md)
            ```
            """,
        "docs/guide.md": "# Guide\n\n## The 2-rank run: `deepspeed`!\n\n## Guide\n[up](../README.md#front-door)\n",
        "tests/x.py": "",
    })
    assert anchors((tmp_path / "docs/guide.md").read_text()) == {"guide", "the-2-rank-run-deepspeed", "guide-1"}
    problems = broken_links(tmp_path, [f for f in files if f.endswith(".md")])
    assert [p.split(": link ")[1].split("'")[1] for p in problems] == [
        "docs/guide.md#the-2-rank-run", "docs/nope.md", "docs/guide.md#missing", "#nowhere", "../outside.md"], problems


def test_path_checker_on_planted_docs(tmp_path):
    files = plant(tmp_path, {
        "docs/page.md": """\
            Run `python benchmarks/run.py` and read benchmarks/results/{a,b}.md, lisa_dist/*.py and
            `tests/unit/test_x.py::test_y`. Missing: `benchmarks/gone.py`, lisa_dist/missing/*.py,
            benchmarks/results/{a,c}.md. Not repo paths: ../docs/page.md /abs/tests/x ~/lisa_dist/y
            ```
            python tests/scripts/absent.py --out /tmp/x
            ```
            """,
        "benchmarks/run.py": "", "benchmarks/results/a.md": "", "benchmarks/results/b.md": "",
        "lisa_dist/core.py": "", "tests/unit/test_x.py": "",
    })
    problems = missing_paths(tmp_path, ["docs/page.md"])
    assert [p.split(": ", 1)[1] for p in problems] == [
        "benchmarks/gone.py does not exist", "lisa_dist/missing/*.py does not exist",
        "benchmarks/results/c.md does not exist", "tests/scripts/absent.py does not exist"], problems
    assert files


def test_citation_and_design_checkers_on_planted_code(tmp_path):
    files = plant(tmp_path, {
        "docs/design.md": "# Design\n\n## Memory floors\n",
        "pkg/a.py": f'"""See docs/design.md#memory-floors and docs/design.md#gone, {DESIGN} section 8."""\n',
        "pkg/b.sh": "# docs/missing.md#x\n",
    })
    assert broken_citations(tmp_path, files) == [
        "pkg/a.py:1: cites docs/design.md#gone, which has no such heading",
        "pkg/b.sh:1: cites docs/missing.md, which does not exist"]
    assert design_mentions(tmp_path, files) == ["pkg/a.py:1"]


def test_readme_name_checker_on_planted_readme():
    readme = textwrap.dedent("""\
        ```python
        from lisa_dist import LisaConfig, NoSuchName
        from lisa_dist.sampling import (LayerSampler,
                                        AlsoMissing)
        import lisa_dist.no_such_module
        x = lisa_dist.config.LisaConfig  # lisa_dist.config.no_such_function
        ```
        Prose outside code blocks is not read here: `from lisa_dist import Nothing`.
        ```bash
        lisa-train --dry-run && lisa-nosuch && python -m lisa_dist.train
        ```
        """)
    imports, dotted, commands = readme_code_names(readme)
    assert imports == ["from lisa_dist import LisaConfig, NoSuchName",
                       "from lisa_dist.sampling import (LayerSampler, AlsoMissing)", "import lisa_dist.no_such_module"]
    assert dotted == ["lisa_dist.config.LisaConfig", "lisa_dist.config.no_such_function", "lisa_dist.no_such_module",
                      "lisa_dist.sampling", "lisa_dist.train"]
    assert commands == ["lisa-nosuch", "lisa-train"]
    failed = unresolved(imports, dotted)
    assert sorted(failed) == ["from lisa_dist import LisaConfig, NoSuchName",
                              "from lisa_dist.sampling import (LayerSampler, AlsoMissing)",
                              "import lisa_dist.no_such_module", "lisa_dist.config.no_such_function",
                              "lisa_dist.no_such_module"], failed
    assert set(commands) - set(console_scripts((ROOT / "setup.py").read_text())) == {"lisa-nosuch"}


def test_readme_length_limit_is_enforced(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "README.md").write_text("line\n" * (README_MAX_LINES + 1))
    with pytest.raises(AssertionError, match="301 lines"):
        test_readme_fits_the_front_door()
    (tmp_path / "README.md").write_text("line\n" * README_MAX_LINES)
    test_readme_fits_the_front_door()
