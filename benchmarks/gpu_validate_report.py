"""The reporting half of benchmarks/gpu_validate.sh (standard library + torch only).

    python gpu_validate_report.py env RESULTS          # RESULTS/env.json: machine, releases, where lisa_dist is
    python gpu_validate_report.py summary RESULTS      # RESULTS/summary.md from the phases' files
    python gpu_validate_report.py digest PACKAGE_DIR   # a digest of a lisa_dist package's sources

`env` and `summary` run with whatever the phases left (a phase that timed out or crashed has no
result file; the summary says so), and never fail the run themselves.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

PHASES = ("env", "checks", "bench", "flat")
PACKAGES = ("torch", "deepspeed", "transformers", "accelerate", "peft", "pydantic", "pydantic-core",
            "typing-extensions", "hjson", "huggingface-hub", "numpy", "lisa_dist")


def digest(package: Path) -> str:
    """sha256 over the relative paths and bytes of a lisa_dist package's .py files and assets, so the
    installed wheel can be compared with the tree it was built from."""
    h = hashlib.sha256()
    for f in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _run(cmd: List[str], timeout: float = 60) -> Optional[str]:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"


def env(results: Path) -> Dict:
    import torch

    out: Dict = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
                 "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                 "cuda_available": torch.cuda.is_available(),
                 "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    if torch.cuda.is_available():
        out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        out["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
    out["releases"] = {}
    for name in PACKAGES:
        try:
            out["releases"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out["releases"][name] = None
    import lisa_dist
    installed = Path(lisa_dist.__file__).resolve().parent
    tree = Path(__file__).resolve().parents[1] / "lisa_dist"
    out["lisa_dist_path"] = str(installed)
    out["lisa_dist_digest"] = digest(installed)
    out["tree_digest"] = digest(tree) if tree.is_dir() else None
    out["lisa_dist_matches_tree"] = out["lisa_dist_digest"] == out["tree_digest"]
    try:  # what every later phase needs: recorded, and the phase fails, when it does not import
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        out["deepspeed_path"] = str(Path(deepspeed.__file__).parent)
        out["deepspeed_accelerator"] = get_accelerator()._name
        out["deepspeed_prebuilt_ops"] = sorted(k for k, v in installed_ops.items() if v)
    except Exception as e:  # noqa: BLE001
        out["deepspeed_error"] = f"{type(e).__name__}: {e}"
    out["nvcc"] = _run(["nvcc", "--version"])
    out["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    try:
        proc = subprocess.run([sys.executable, "-m", "lisa_dist.versions", "--json"], capture_output=True, text=True,
                              timeout=60)
        out["lisa_dist_versions"] = json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        out["lisa_dist_versions"] = f"{type(e).__name__}: {e}"
    (results / "env.json").write_text(json.dumps(out, indent=1))
    return out


def _load(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _scenario_lines(results: Optional[Dict]) -> List[str]:
    if not results:
        return ["  (no result file: the phase died before its first scenario finished; see its log)"]
    lines = []
    for name, r in results.items():
        if name.startswith("_"):
            continue
        state = "passed" if r.get("passed") else f"FAILED: {r.get('error', '?')}"
        lines.append(f"  - {name} ({r.get('seconds', 0):.1f} s): {state}")
    return lines


def summary(results: Path) -> str:
    phases = _load(results / "phases.json") or {}
    env_ = _load(results / "env.json") or {}
    lines = ["# lisa_dist GPU validation", ""]
    if env_:
        rel = env_.get("releases", {})
        lines += [f"- machine: {', '.join(env_.get('gpus') or []) or 'no GPU (rehearsal)'}; {env_.get('cpus')} CPUs; "
                  f"python {env_.get('python')}; torch {env_.get('torch')} (CUDA {env_.get('cuda')}, "
                  f"NCCL {env_.get('nccl', '-')}); deepspeed {rel.get('deepspeed')} "
                  f"(accelerator {env_.get('deepspeed_accelerator')}); transformers {rel.get('transformers')}; "
                  f"accelerate {rel.get('accelerate')}; peft {rel.get('peft')}",
                  f"- lisa_dist from {env_.get('lisa_dist_path')} (digest {env_.get('lisa_dist_digest')}; "
                  f"{'matches' if env_.get('lisa_dist_matches_tree') else 'DOES NOT MATCH'} the tree)"]
    lines += ["", "| phase | result | seconds | limit |", "|---|---|---|---|"]
    for name in ("install",) + PHASES:
        p = phases.get(name)
        if p is None:
            lines.append(f"| {name} | not run | - | - |")
            continue
        rc = p.get("rc")
        result = ("passed" if rc == 0 else "skipped (no time left)" if p.get("skipped")
                  else f"TIMED OUT (rc {rc})" if rc in (124, 137) else f"FAILED (rc {rc})")
        lines.append(f"| {name} | {result} | {p.get('seconds', 0):.0f} | {p.get('limit', '-')} |")
    for name in ("checks", "flat"):
        if name in phases:
            lines += ["", f"## {name}", *_scenario_lines(_load(results / name / "rank0.json"))]
    flat = (_load(results / "flat" / "rank0.json") or {}).get("flat_memory")
    if flat and "memory" in flat:
        lines += [f"  flat_memory: {flat['switches']} switches, {flat['memory_kind']}; spread of memory minus "
                  f"optimizer bytes {flat['rest_spread_bytes']} B (tolerance {flat['tolerance_bytes']:.0f}); median "
                  f"early {flat['early_median']} B, late {flat['late_median']} B; "
                  f"{flat['seconds_per_step_and_switch']:.3f} s per step + switch"]
    bench_md = results / "bench" / "bench.md"
    if bench_md.is_file():
        lines += ["", "## bench", "", bench_md.read_text()]
    elif "bench" in phases:
        lines += ["", "## bench", "  (no bench.md: see bench.log)"]
    text = "\n".join(lines) + "\n"
    (results / "summary.md").write_text(text)
    return text


def main(argv: List[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("env", "summary", "digest"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "digest":
        print(digest(Path(argv[1])))
        return 0
    results = Path(argv[1])
    if argv[0] == "env":
        out = env(results)
        print(json.dumps(out, indent=1))
        return 1 if "deepspeed_error" in out else 0
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
