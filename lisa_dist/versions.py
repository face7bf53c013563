"""The releases lisa_dist is tested with, and what it does outside them: the one source of truth.

`setup.py` (floors and extras), the adapters (one warning per library per process, probes of every
private API they use), `docs/supported-releases.md` (rendered from CI's matrix output by
`python -m lisa_dist.versions --support-table`) and the tests all read this file. It imports only
the standard library, so `setup.py` can load it before torch is installed.

The policy:
- inside a library's tested ranges: silent;
- outside them, older or newer: one `UntestedReleaseWarning` per library per process, naming the
  release, the tested ranges and how to report a problem; then lisa_dist goes on;
- an adapter refuses only when a probe of the exact private attribute, signature or behaviour it
  relies on fails (`require`, `require_attrs`): the error names what is missing and the newest
  release known to have it;
- `LISA_DIST_STRICT_VERSIONS=1` turns the warning into a refusal, for clusters that want it;
- pip refuses only releases known to be broken (`Library.floor`, `Library.broken`), never a
  blanket upper bound.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

STRICT_ENV = "LISA_DIST_STRICT_VERSIONS"
REPORT = ("report it with the output of `python -m lisa_dist.versions` in an issue of the lisa_dist repository "
          "(title: '<library> <release>: ...')")


@dataclass(frozen=True)
class Library:
    name: str
    """Distribution name on PyPI (also the import name)."""

    tested: Tuple[Tuple[str, str], ...]
    """[low, high) release ranges CI runs (the pinned set and the release matrix); silent inside."""

    newest: str
    """The newest release CI ran, what errors suggest installing."""

    used_for: str
    """What lisa_dist uses the library for, as the support table says it."""

    floor: Optional[Tuple[str, str]] = None
    """(release, what breaks below it): setup.py's lower bound, only where something is known to break."""

    broken: Tuple[Tuple[str, str], ...] = ()
    """(release, what is broken) that pip refuses through setup.py besides the floor."""

    def requirement(self) -> str:
        """What setup.py declares: the floor and the known-broken releases, never an upper bound."""
        parts = ([f">={self.floor[0]}"] if self.floor else []) + [f"!={release}" for release, _ in self.broken]
        return self.name + ",".join(parts)


LIBRARIES: Dict[str, Library] = {lib.name: lib for lib in (
    Library("torch", (("2.11", "2.16"),), newest="2.15.0",
            used_for="every backend; FSDP2's private mixed-precision init (backends/torch_compat.py)",
            floor=("2.6", "torch.distributed.fsdp.fully_shard and FSDPModule became public in 2.6")),
    Library("deepspeed", (("0.17.6", "0.18"), ("0.18.9", "0.19"), ("0.19.8", "0.20")), newest="0.19.8",
            used_for="the ZeRO-1/2/3 engine hook, which rebuilds DeepSpeed's ZeRO optimizer at each switch"),
    Library("transformers", (("5.17", "5.26"),), newest="5.25.0",
            used_for="models and tokenizers; Trainer for lisa_dist.integrations.hf",
            floor=("4.56", "from_pretrained/from_config take dtype= from 4.56 (transformers PR #39782)")),
    Library("accelerate", (("1.15", "1.17"),), newest="1.16.0",
            used_for="lisa_dist.integrations.hf and lisa_dist.integrations.accelerate (Accelerator.prepare)"),
    Library("trl", (("1.16", "1.17"),), newest="1.16.0", used_for="SFTTrainer with LisaCallback (tests)"),
    Library("peft", (("0.21", "0.22"),), newest="0.21.2",
            used_for="the LoRA rows of the planner and the benchmarks (tests, benchmarks)"),
)}

# The release matrix CI runs beside the pinned set (constraints/tested.txt), one virtual environment
# per leg (.ci/matrix.sh LEG): each pins the releases named here; "newest" leaves every other library
# unpinned, so it takes the newest release on PyPI on the day CI runs. `checks` names what runs in it:
# hf = Trainer/accelerate, zero = DeepSpeed ZeRO-1/2/3, fsdp2 = the FSDP2 backend.
MATRIX: Dict[str, Dict[str, object]] = {
    "oldest": {"pins": {"torch": "2.11.0", "transformers": "5.17.0", "accelerate": "1.15.0"},
               "checks": ("hf", "zero", "fsdp2"),
               "why": "the GPU image's stack (torch 2.11, transformers 5.17, accelerate 1.15)"},
    "newest": {"pins": {"torch": "2.15.0"}, "checks": ("hf", "zero", "fsdp2"),
               "why": "torch 2.15 and the newest transformers, accelerate, trl, peft, datasets "
                      "and DeepSpeed of the day"},
    "torch-2.14": {"pins": {"torch": "2.14.1"}, "checks": ("fsdp2",),
                   "why": "FSDP2 on the torch release between the pinned one and the newest"},
    "deepspeed-0.17": {"pins": {"deepspeed": "0.17.6"}, "checks": ("zero",),
                       "why": "the oldest DeepSpeed release the ZeRO hook is tested with"},
    "deepspeed-0.18": {"pins": {"deepspeed": "0.18.9"}, "checks": ("zero",), "why": "DeepSpeed 0.18"},
}


class UntestedReleaseWarning(UserWarning):
    """A library release outside the ranges lisa_dist is tested with; lisa_dist goes on."""


class IncompatibleReleaseError(RuntimeError):
    """A private API an adapter relies on is missing from the installed release."""


# --- release comparison (standard library only: setup.py runs before packaging may be installed) --

def release_tuple(version: str) -> Tuple[int, ...]:
    """(major, minor, micro) of a PEP 440 version, local labels and pre-release tags dropped:
    "2.13.0+cpu" -> (2, 13, 0), "5.26.0.dev0" -> (5, 26, 0), "0.19" -> (0, 19, 0)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"not a release version: {version!r}")
    parts = tuple(int(x) for x in match.group(1).split("."))[:3]
    return parts + (0,) * (3 - len(parts))


def in_tested_range(library: str, version: str) -> bool:
    release = release_tuple(version)
    return any(release_tuple(lo) <= release < release_tuple(hi) for lo, hi in LIBRARIES[library].tested)


def describe_ranges(library: str) -> str:
    return " or ".join(f">={lo},<{hi}" for lo, hi in LIBRARIES[library].tested)


# --- the policy -------------------------------------------------------------------------------

_warned: Set[str] = set()
_probed: Set[str] = set()


def strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def installed_versions(library: str) -> List[str]:
    """The release of `library` as its imported module says it and as its metadata says it (one
    entry when they agree; none when it is not installed). Both count: a patched copy may change
    only one of them."""
    found = []
    module = sys.modules.get(library)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        found.append(module.__version__)
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            meta = version(library)
        except PackageNotFoundError:
            meta = None
    except ImportError:  # pragma: no cover - Python < 3.8
        meta = None
    if meta is not None and meta not in found:
        found.append(meta)
    return found


def check_release(library: str, installed: Optional[str] = None) -> None:
    """Inside the tested ranges: nothing. Outside: one UntestedReleaseWarning per library per
    process, or, under LISA_DIST_STRICT_VERSIONS=1, an IncompatibleReleaseError."""
    versions = [installed] if installed is not None else installed_versions(library)
    outside = [v for v in versions if not in_tested_range(library, v)]
    if not outside:
        return
    version = outside[0]
    lib = LIBRARIES[library]
    side = "newer" if release_tuple(version) >= release_tuple(lib.tested[-1][1]) else "older"
    message = (f"lisa_dist: {library} {version} is {side} than the releases lisa_dist is tested with "
               f"({library}{describe_ranges(library)}; used for {lib.used_for}). lisa_dist goes on: its adapters "
               "probe every private API they use and stop with an error naming what is missing. If anything "
               f"misbehaves, {REPORT}. Set {STRICT_ENV}=1 to refuse untested releases instead.")
    if strict():
        raise IncompatibleReleaseError(
            f"{message.replace('lisa_dist goes on', f'{STRICT_ENV}=1 refuses it', 1)} Install a tested release "
            f"(pip install '{library}{_pip_range(library)}') or unset {STRICT_ENV}.")
    if library not in _warned:
        _warned.add(library)
        warnings.warn(message, UntestedReleaseWarning, stacklevel=3)


def _pip_range(library: str) -> str:
    lo, hi = LIBRARIES[library].tested[-1]
    return f">={lo},<{hi}"


@dataclass(frozen=True)
class Probe:
    what: str
    """The private attribute, signature or behaviour, as the error names it."""

    present: Callable[[], bool]
    """True when the installed release has it (an exception counts as missing)."""

    last_seen: Optional[str] = None
    """The newest release known to have it; default: the newest tested release."""


def _holds(probe: Probe) -> bool:
    try:
        return bool(probe.present())
    except Exception:  # an import or attribute error inside the probe means the thing is gone
        return False


def require(library: str, key: str, probes: Sequence[Probe]) -> None:
    """Run `probes` once per process (per `key`); raise IncompatibleReleaseError naming every one
    that fails. Call at the first use of the adapter, after check_release."""
    if key in _probed:
        return
    missing = [p for p in probes if not _holds(p)]
    if missing:
        raise IncompatibleReleaseError(missing_message(library, [(p.what, p.last_seen) for p in missing]))
    _probed.add(key)


def require_attrs(library: str, obj: object, label: str, names: Iterable[str], key: Optional[str] = None) -> None:
    """Probe attributes of a live object (instance attributes exist only once it is built), once per
    process per `key` (default: the label)."""
    key = key or label
    if key in _probed:
        return
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise IncompatibleReleaseError(missing_message(library, [(f"{label}.{n}", None) for n in missing]))
    _probed.add(key)


def has_signature(func: Callable, *params: str) -> bool:
    """Whether `func` accepts every named parameter (a probe of a private signature)."""
    import inspect
    accepted = inspect.signature(func).parameters
    return all(p in accepted for p in params)


def missing_message(library: str, missing: Sequence[Tuple[str, Optional[str]]]) -> str:
    installed = ", ".join(installed_versions(library)) or "?"
    newest = LIBRARIES[library].newest
    lines = "; ".join(f"{what} (last seen in {library} {last or newest})" for what, last in missing)
    return (f"lisa_dist cannot run on {library} {installed}: it relies on {lines}, which this release does not have. "
            f"Install a release that has it (pip install '{library}=={newest}', the newest one lisa_dist is tested "
            f"with), and {REPORT}.")


# --- reports ------------------------------------------------------------------------------------

def installed_report() -> Dict[str, Dict[str, object]]:
    """Per library: the installed release (None when absent) and whether it is inside the tested ranges."""
    out: Dict[str, Dict[str, object]] = {}
    for name in LIBRARIES:
        versions = installed_versions(name)
        version = versions[0] if versions else None
        out[name] = {"installed": version, "tested_ranges": describe_ranges(name),
                     "in_tested_range": None if version is None else in_tested_range(name, version)}
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m lisa_dist.versions`: the installed releases against the tested ranges (JSON with --json)."""
    import argparse
    import json
    import platform

    parser = argparse.ArgumentParser(prog="python -m lisa_dist.versions", description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--support-table", nargs="+", metavar="MATRIX_JSON",
                        help="render docs/supported-releases.md from the matrix legs' result files")
    args = parser.parse_args(argv)
    if args.support_table:
        from pathlib import Path
        sys.stdout.write(support_table([json.loads(Path(p).read_text()) for p in args.support_table]))
        return 0
    report = installed_report()
    if args.json:
        print(json.dumps({"python": platform.python_version(), "libraries": report}, indent=1))
        return 0
    print(f"python {platform.python_version()} on {platform.platform()}")
    for name, row in report.items():
        state = ("not installed" if row["installed"] is None else
                 "tested" if row["in_tested_range"] else "UNTESTED (warns)")
        print(f"{name:13s} {str(row['installed']):24s} {state:18s} tested: {row['tested_ranges']}")
    return 0


def _refused(lib: Library) -> str:
    """What pip refuses for `lib` (setup.py), with why; "none" when nothing is known to break."""
    parts = ([f"<{lib.floor[0]} ({lib.floor[1]})"] if lib.floor else []) + [f"{r} ({why})" for r, why in lib.broken]
    return "; ".join(parts) or "none"


def support_table(legs: Sequence[Dict[str, object]]) -> str:
    """docs/supported-releases.md from the result files .ci/matrix.sh writes (one per leg): per leg,
    the releases it resolved and, per backend, passed / FAILED; per library, which releases warn."""
    checks = {"hf": "Trainer / accelerate", "zero": "DeepSpeed ZeRO-1/2/3", "fsdp2": "FSDP2"}
    names = list(LIBRARIES)
    head = ["leg", "date", "python"] + names + [checks[c] for c in checks]
    rows = []
    for leg in legs:
        resolved = leg["resolved"]
        cells = [f"`{leg['leg']}`", str(leg["date"]), str(leg["python"])]
        for name in names:
            version = resolved.get(name)
            if version is None:
                cells.append("-")
            else:
                cells.append(f"{version}" + ("" if in_tested_range(name, version) else " (warns)"))
        for check in checks:
            result = leg["checks"].get(check)
            if result is None:
                cells.append("-")
            else:  # the counts of pytest's summary line, e.g. "86 passed, 28 skipped"
                counts = re.sub(r" in [0-9.]+s.*$", "", str(result.get("summary", ""))).strip()
                cells.append(("passed" if result["passed"] else "**FAILED**") + (f" ({counts})" if counts else ""))
        rows.append(cells)
    lines = [
        "# Supported releases",
        "",
        "Generated by `python -m lisa_dist.versions --support-table benchmarks/results/matrix/*.json` from the",
        "files CI's release matrix writes (`.ci/matrix.sh`); do not edit by hand. Each row is one virtual",
        "environment: the releases it resolved and the result of each group of checks in it (pytest's counts;",
        "a skip names its reason in the leg's log). The pinned set the README's test command runs on is",
        "`constraints/tested.txt`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ] + ["| " + " | ".join(r) + " |" for r in rows] + [
        "",
        "## The policy, per library",
        "",
        "| library | tested (silent) | outside: warns once per process | refused by pip (setup.py) |",
        "|---|---|---|---|",
    ] + [f"| {lib.name} | {describe_ranges(lib.name)} | any other release | {_refused(lib)} |"
         for lib in LIBRARIES.values()] + [
        "",
        f"`{STRICT_ENV}=1` refuses every release outside the tested ranges instead of warning. Whatever the",
        "release, an adapter stops with an error naming the missing private API when one of its probes fails",
        "(see [the policy](versions.md)).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
