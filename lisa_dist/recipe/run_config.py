"""`RunConfig`: everything one `lisa-train` run is told, as a typed dataclass.

It is the single source of the command line and of `--config` files: each field becomes the flag of
the same name (underscores as dashes), its docstring is the flag's help, a `Literal` type gives the
choices and a bool a switch. Its `lisa` field is a LisaConfig, and the LISA flags are generated the
same way from LisaConfig's own fields and docstrings, so every LisaConfig field has its flag (booleans,
which default to True there, get `--X` and `--no-X`). It is validated once, in `__post_init__` and
LisaConfig's, with errors that name the flag; the recipe hands typed pieces of it (a LisaConfig, numbers,
a resolved DeepSpeed config) to the backends, which never see it or the argparse Namespace.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import re
import textwrap
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

from lisa_dist.config import LisaConfig


def _opt(default: Any = MISSING, group: str = "", *, factory=None, **meta):
    """A field with its argparse group (and, rarely, extra argparse options) in the metadata."""
    if factory is not None:
        return field(default_factory=factory, metadata={"group": group, **meta})
    return field(default=default, metadata={"group": group, **meta})


@dataclass
class RunConfig:
    # --- model and data ----------------------------------------------------------------------
    model: str = _opt("tiny-llama", "model and data")
    """a preset name (tiny-llama: random init, no download), a local directory written by save_pretrained,
    or a Hugging Face model id"""

    tokenizer: Optional[str] = _opt(None, "model and data")
    """tokenizer directory or id; default: the model's, or the embedded one for presets"""

    trust_remote_code: bool = _opt(False, "model and data")
    """allow custom modelling code of --model"""

    data: Optional[str] = _opt(None, "model and data")
    """JSONL file (Alpaca, chat or plain text); default: the shipped Alpaca-style set"""

    data_format: Literal["auto", "alpaca", "chat", "text"] = _opt("auto", "model and data")
    """shape of the --data records; auto: detected from each record's keys (Alpaca records get the
    "### Instruction/### Response" prompt); chat: also renders Alpaca records through the tokenizer's chat
    template (instruction and input as the user turn, output as the assistant's), the format an instruct
    model was tuned on"""

    max_length: int = _opt(512, "model and data")
    """tokens per example; what happens to longer ones is --overlong's choice, and a line says how many there
    were. Batches are padded to their longest example, so short data costs nothing extra"""

    overlong: Literal["truncate", "drop"] = _opt("truncate", "model and data")
    """an example longer than --max-length: truncate keeps its first max-length tokens (its end, often the
    answer and EOS, is not trained on; one left with no response token is dropped), drop leaves it out"""

    eval_data: Optional[str] = _opt(None, "evaluation")
    """held-out data in the forms --data takes, read and masked as it is (--data-format, --max-length);
    its loss (token-weighted mean over every label token, the ranks sharing the examples) is evaluated
    every --eval-steps and after the last step, and logged to lisa_log.json and --report-to"""

    eval_steps: int = _opt(0, "evaluation")
    """optimizer steps between evaluations of --eval-data (0: only after the last step)"""

    eval_batch_size: Optional[int] = _opt(None, "evaluation")
    """held-out examples per forward per rank; default: --batch-size"""

    dtype: Literal["auto", "bf16", "fp32", "fp16"] = _opt("auto", "model and data")
    """weights dtype; masters are always fp32. auto: bf16 on a GPU, fp32 on a CPU, where bf16 matmuls are
    emulated (measured 8x slower per step for the tiny preset here). fp16 (GPUs without bf16, e.g. V100,
    T4): --backend deepspeed only, with DeepSpeed's dynamic loss scaling"""

    # --- LISA --------------------------------------------------------------------------------
    lisa: LisaConfig = _opt(group="LISA", factory=LisaConfig)
    """LISA's settings: one flag per LisaConfig field, generated from it (lisa_flags). `seed` also seeds
    the init of presets and the data order."""

    # --- optimisation ------------------------------------------------------------------------
    steps: int = _opt(150, "optimisation")
    """optimizer steps"""

    batch_size: int = _opt(8, "optimisation")
    """examples per micro-batch per rank"""

    grad_accum: int = _opt(1, "optimisation")
    """micro-batches per optimizer step"""

    lr: float = _opt(1e-3, "optimisation")
    """peak learning rate (AdamW), reached after the warm-up"""

    weight_decay: float = _opt(0.0, "optimisation")
    """AdamW weight decay"""

    warmup_steps: int = _opt(10, "optimisation")
    """optimizer steps of linear learning-rate warm-up"""

    max_grad_norm: float = _opt(1.0, "optimisation")
    """0 disables clipping"""

    # --- backend -----------------------------------------------------------------------------
    backend: Literal["single", "deepspeed", "fsdp2"] = _opt("single", "backend")
    """single: one process (LisaOptimizer); deepspeed: ZeRO-1/2/3 (needs --deepspeed); fsdp2: under torchrun"""

    deepspeed: Optional[str] = _opt(None, "backend")
    """DeepSpeed JSON config (ds_configs/zero2.json ...); with --backend deepspeed"""

    local_rank: int = _opt(group="backend", factory=lambda: int(os.environ.get("LOCAL_RANK", 0)),
                           flags=("--local_rank", "--local-rank"), hidden=True)
    """the deepspeed launcher passes it; the rank's device comes from LOCAL_RANK"""

    cpu_offload: bool = _opt(False, "backend")
    """FSDP2: keep sharded params and optimizer on the CPU"""

    gradient_checkpointing: bool = _opt(False, "backend")
    """recompute each decoder layer's activations in backward (non-reentrant) to save activation memory"""

    # --- output ------------------------------------------------------------------------------
    output_dir: str = _opt("runs/lisa", "output")
    """final weights, tokenizer and lisa_log.json"""

    log_every: int = _opt(10, "output")
    """steps between log lines when there is no terminal"""

    report_to: Literal["none", "tensorboard"] = _opt("none", "output")
    """tensorboard: rank 0 logs loss, learning rate, tokens/s, the active layers and each switch's time and
    memory to OUTPUT_DIR/tensorboard (torch's SummaryWriter; needs the tensorboard package)"""

    no_plots: bool = _opt(False, "output")
    """skip the PNGs written at the end (OUTPUT_DIR/lisa_schedule.png: layers x steps; lisa_memory.png:
    memory at each switch; need matplotlib)"""

    no_save: bool = _opt(False, "output")
    """skip writing the final weights"""

    save_steps: int = _opt(0, "output")
    """write a resumable checkpoint to OUTPUT_DIR/checkpoints/step-N every N optimizer steps and at the last
    one (0: never)"""

    keep_last: int = _opt(0, "output")
    """keep only the newest N checkpoints (0: keep all)"""

    resume: Optional[str] = _opt(None, "output", metavar="PATH|auto")
    """continue from a checkpoint directory, or `auto`: the latest complete one in OUTPUT_DIR/checkpoints
    (a fresh start if there is none)"""

    dry_run: bool = _opt(False, "output")
    """print world size, the per-rank peak memory of full fine-tuning, LISA and LoRA (model states, the
    activations and logits of a --batch-size x --max-length step traced on the meta device, the engine's
    buffers) and the first switches, from the model's config (no weights loaded), then exit"""

    dry_run_lora_rank: int = _opt(8, "output")
    """LoRA rank of the dry run's comparison row (PEFT on all linear layers but the head, base weights frozen)"""

    dry_run_lora_targets: str = _opt("all-linear", "output")
    """modules the dry run's LoRA row adapts: all-linear (every linear layer of the decoder, PEFT's
    target_modules="all-linear") or comma-separated module names, e.g. q_proj,v_proj"""

    def __post_init__(self):
        _check_types(self)
        for name in ("steps", "batch_size", "grad_accum", "max_length", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("save_steps", "keep_last", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        self._check_eval()
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.backend == "deepspeed" and not self.deepspeed:
            raise ValueError("--backend deepspeed needs --deepspeed CONFIG.json (see ds_configs/)")
        if self.deepspeed and self.backend != "deepspeed":
            raise ValueError("--deepspeed is only used with --backend deepspeed")
        if self.dtype == "fp16" and self.backend != "deepspeed":
            # fp16 gradients underflow without a loss scaler, and only DeepSpeed's is wired in.
            raise ValueError(f"--dtype fp16 needs --backend deepspeed (its dynamic loss scaling); --backend "
                             f"{self.backend} trains in bf16 or fp32: use --dtype bf16 or --dtype fp32")

    def _check_eval(self) -> None:
        if self.eval_steps < 0:
            raise ValueError(f"--eval-steps must be >= 0 (0: evaluate only after the last step), got {self.eval_steps}")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise ValueError(f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        if not self.eval_data:
            for name in ("eval_steps", "eval_batch_size"):
                if getattr(self, name):
                    raise ValueError(f"{_flag(name)} needs --eval-data FILE (the held-out set to evaluate)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cli_fields():
    """RunConfig's own flags; `lisa` stands for the generated LISA flags."""
    return [f for f in fields(RunConfig) if f.init and f.name != "lisa"]


def _hints() -> Dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _base(kind):
    """(the value type, its choices or None, whether None is allowed) of a field's annotation."""
    optional = False
    if typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional, kind = True, args[0]
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return type(choices[0]), choices, optional
    if typing.get_origin(kind) is tuple:  # LisaConfig.layer_weights: Tuple[float, ...]
        return tuple, None, optional
    return kind, None, optional


def _checked(flag: str, value: Any, hint) -> Any:
    """`value` for `flag` as its annotation `hint` wants it (ints widened to floats, a list or "1,1,2" as a
    tuple of numbers); ValueError naming the flag otherwise. Values from a --config file arrive here
    unconverted."""
    kind, choices, optional = _base(hint)
    if value is None and optional:
        return None
    if kind is tuple:
        try:
            value = _numbers(value) if isinstance(value, str) else value
        except ValueError as e:
            raise ValueError(f"{flag} {e}") from None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{flag} must be a list of numbers, got {value!r} ({type(value).__name__})")
        return tuple(value)
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
    if not ok:
        raise ValueError(f"{flag} must be {'a' if kind is not int else 'an'} {kind.__name__}, "
                         f"got {value!r} ({type(value).__name__})")
    if choices is not None and value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return float(value) if kind is float else value


def _numbers(value: str) -> Tuple[float, ...]:
    """--layer-weights "1,1,2" as floats."""
    try:
        return tuple(float(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{value!r}: expected comma-separated numbers, one per decoder layer, e.g. 1,1,2,4") from None


def _numbers_arg(text: str) -> Tuple[float, ...]:
    try:
        return _numbers(text)
    except ValueError as e:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_types(run: RunConfig) -> None:
    hints = _hints()
    for f in _cli_fields():
        setattr(run, f.name, _checked(_flag(f.name), getattr(run, f.name), hints[f.name]))
    if not isinstance(run.lisa, LisaConfig):
        raise ValueError(f"RunConfig.lisa must be a LisaConfig, got {run.lisa!r} ({type(run.lisa).__name__})")


def field_docs(cls=RunConfig) -> Dict[str, str]:
    """Each field's docstring (the string literal right after it in the class body), whitespace folded."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


# --- the LISA flags, generated from LisaConfig -------------------------------------------------------

_LISA_NOTES = {"seed": "lisa-train also seeds the init of presets and the data order with it."}
"""What lisa-train does with a LisaConfig field beyond what its docstring says, appended to the help."""


def lisa_flags() -> Dict[str, List[str]]:
    """LisaConfig field -> its flags: --activated-layers, ...; a boolean both --X and --no-X."""
    hints = typing.get_type_hints(LisaConfig)
    return {f.name: [_flag(f.name)] + ([_flag("no_" + f.name)] if _base(hints[f.name])[0] is bool else [])
            for f in fields(LisaConfig)}


def lisa_help() -> Dict[str, str]:
    """Each LISA flag's help: the LisaConfig field's docstring (and lisa-train's note, for seed)."""
    docs = field_docs(LisaConfig)
    return {f.name: " ".join(filter(None, (docs.get(f.name), _LISA_NOTES.get(f.name)))) for f in fields(LisaConfig)}


def _add_lisa_flags(group) -> None:
    hints, helps = typing.get_type_hints(LisaConfig), lisa_help()
    for f in fields(LisaConfig):
        kind, choices, _ = _base(hints[f.name])
        kwargs: Dict[str, Any] = {"dest": f.name, "default": f.default, "help": helps[f.name].replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kwargs.update(type=_numbers_arg, metavar="W1,W2,...")
        else:
            kwargs["type"] = kind
            if choices is not None:
                kwargs["choices"] = choices
        group.add_argument(_flag(f.name), **kwargs)


def lisa_config(values: Dict[str, Any]) -> LisaConfig:
    """The LisaConfig of the LISA flags' values; errors name the flag (--activated-layers, not the field)."""
    hints = typing.get_type_hints(LisaConfig)
    checked = {name: _checked(_flag(name), value, hints[name]) for name, value in values.items()}
    try:
        return LisaConfig(**checked)
    except ValueError as e:
        raise ValueError(re.sub(r"LisaConfig\.(\w+)", lambda m: _flag(m.group(1)), str(e))) from None


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lisa-train", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML or JSON file whose keys are these flags' names (or LisaConfig's fields)")
    docs, hints, groups = field_docs(), _hints(), {}
    for f in [f for f in fields(RunConfig) if f.init]:
        name = f.metadata["group"]
        if name not in groups:
            groups[name] = p.add_argument_group(name)
        if f.name == "lisa":
            _add_lisa_flags(groups[name])
            continue
        kind, choices, _ = _base(hints[f.name])
        default = f.default_factory() if f.default is MISSING else f.default
        kwargs: Dict[str, Any] = {"dest": f.name, "default": default,
                                  "help": argparse.SUPPRESS if f.metadata.get("hidden") else docs[f.name]}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = kind
            if choices is not None:
                kwargs["choices"] = choices
            if "metavar" in f.metadata:
                kwargs["metavar"] = f.metadata["metavar"]
        groups[name].add_argument(*f.metadata.get("flags", (_flag(f.name),)), **kwargs)
    return p


def read_config_file(path: str) -> Dict[str, Any]:
    """A --config file's mapping, keys normalised to field names (RunConfig's and LisaConfig's; a
    LISA switch's `no_X` becomes X, negated); ValueError for anything off."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as e:  # yaml and json raise different types; both mean a malformed file
        raise ValueError(f"--config {path}: cannot parse: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    known = {f.name for f in _cli_fields()} | {f.name for f in fields(LisaConfig)}
    negated = {"no_" + name: name for name, flags in lisa_flags().items() if len(flags) == 2}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in negated:
            out[negated[name]] = not _checked(_flag(name), value, bool)
        elif name in known:
            out[name] = value
        else:
            raise ValueError(f"--config {path}: unknown key {key!r}; keys are the flag names, e.g. activated_layers")
    return out


def parse_args(argv: Optional[List[str]] = None, description: Optional[str] = None) -> RunConfig:
    """The RunConfig of a command line (and its --config file; flags on the command line win).
    Bad input exits 2 with argparse's usage line and the reason."""
    parser = build_parser(description)
    pre, _ = parser.parse_known_args(argv)
    try:
        if pre.config:
            parser.set_defaults(**read_config_file(pre.config))
        values = vars(parser.parse_args(argv))
        values.pop("config")
        lisa = lisa_config({f.name: values.pop(f.name) for f in fields(LisaConfig)})
        return RunConfig(**values, lisa=lisa)
    except ValueError as e:
        parser.error(str(e))
