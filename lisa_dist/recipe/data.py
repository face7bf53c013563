"""Fine-tuning data in Alpaca, chat or plain-text form, tokenized with loss masking.

Sources: a JSONL file (or one JSON array), a Parquet or CSV file, or a folder written by a Hugging
Face `datasets` Dataset/DatasetDict's save_to_disk; Python callers may also pass a `datasets.Dataset`
or a list of records. JSON stays on this module's own reader, whose errors name the line; the
columnar formats go through `datasets` (local loaders only, never the hub) and errors name the row.

Labels follow the Hugging Face convention: `labels` is aligned with `input_ids` (the model shifts
them), and -100 marks positions that contribute no loss (prompts, padding).

Batches come from `BatchIterator`, whose batch for a step is a pure function of (seed, step), so
a resumed run and every data-parallel rank agree on the data without communicating.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

IGNORE_INDEX = -100
"""Label value that the Hugging Face causal-LM loss skips."""

FORMATS = ("alpaca", "chat", "text")
OVERLONG = ("truncate", "drop")
"""What build_dataset does with an example longer than max_length: keep its head, or leave it out."""
ACCEPTED_SHAPES = ('alpaca: {"instruction": str, "input": str (optional), "output": str}; '
                   'chat: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}; '
                   'text: {"text": str}')
CHAT_ROLES = ("system", "user", "assistant")

# The Alpaca section layout without its one-sentence preamble: the preamble is ~20 tokens of
# constant text per example, which a 128-token context cannot spare.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

PathLike = Union[str, Path]
Record = Dict[str, Any]


SOURCES = ("a JSONL file (one JSON object per line) or a JSON array file, a .parquet or .csv file, or a "
           "folder written by datasets' save_to_disk")
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}
"""File suffix -> the `datasets` packaged loader that reads it."""
SPLIT = "train"
"""The split taken from a saved DatasetDict (or its only split)."""


def _read_records(path: PathLike) -> List[Tuple[str, Record]]:
    """(location, record) pairs; the location ("line 7", "row 3") lets later errors point into the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; pass {SOURCES}")
    if path.is_dir():
        located = _dataset_rows(_load_saved(path), path)
    elif path.suffix.lower() in TABLE_SUFFIXES:
        located = _dataset_rows(_load_table(path, TABLE_SUFFIXES[path.suffix.lower()]), path)
    else:
        located = _read_json(path)
    for where, item in located:
        if not isinstance(item, dict):
            raise ValueError(f"{path}: {where} is a JSON {type(item).__name__}, expected an object "
                             f"of one of these shapes: {ACCEPTED_SHAPES}")
    if not located:
        raise ValueError(f"{path}: the file contains no examples; expected one JSON object per line"
                         if path.is_file() and path.suffix.lower() not in TABLE_SUFFIXES else
                         f"{path}: the dataset has no rows")
    return located


def _read_json(path: Path) -> List[Tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        # A single JSON array is how the original Alpaca release (alpaca_data.json) ships.
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON array at line {err.lineno}: {err.msg}") from err
        located = [(f"element {i}", item) for i, item in enumerate(items)]
    else:
        located = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({err}); every non-blank line "
                                 "must be one complete JSON object") from err
            located.append((f"line {lineno}", item))
    return located


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError("Parquet, CSV and save_to_disk data are read with Hugging Face datasets: "
                         "pip install datasets (or convert the data to JSONL)") from None
    return datasets


def _load_table(path: Path, loader: str):
    # A packaged loader on a local file: datasets reads and caches it without asking the hub.
    datasets = _datasets()
    try:
        return datasets.load_dataset(loader, data_files=str(path), split="train")
    except Exception as err:  # pyarrow and pandas raise many types; all mean an unreadable file
        cause = err.__cause__ or err  # datasets wraps the parser's error in a DatasetGenerationError
        raise ValueError(f"{path}: cannot read it as {loader.upper() if loader == 'csv' else 'Parquet'} "
                         f"({type(cause).__name__}: {cause}); pass {SOURCES}") from None


def _load_saved(path: Path):
    datasets = _datasets()
    if not any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
        raise ValueError(f"data path {str(path)!r} is a directory but not one written by datasets' save_to_disk "
                         f"(no dataset_dict.json or state.json in it); pass {SOURCES}")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged folder fails in arrow or json; say which folder
        raise ValueError(f"{path}: cannot load the save_to_disk folder ({type(err).__name__}: {err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if SPLIT not in loaded and len(splits) != 1:
            raise ValueError(f"{path}: the saved DatasetDict has splits {splits} and none is {SPLIT!r}; "
                             f"save the split to train on as {SPLIT!r} or on its own")
        loaded = loaded[SPLIT if SPLIT in loaded else splits[0]]
    return loaded


def _dataset_rows(rows, source) -> List[Tuple[str, Record]]:
    """A datasets.Dataset's rows as records. Columnar formats give every row every column, None
    where a record had no value; dropping those keeps format detection by keys working on tables
    that mix shapes (a row without `messages` must not detect as chat)."""
    located = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i} is a {type(row).__name__}, expected a mapping of column names "
                             f"to values of one of these shapes: {ACCEPTED_SHAPES}")
        located.append((f"row {i}", {k: v for k, v in row.items() if v is not None}))
    return located


def load_jsonl(path: PathLike) -> List[Record]:
    """The JSON objects of a JSONL file (blank lines skipped), or of a file holding one JSON array."""
    return [record for _, record in _read_records(path)]


def detect_format(record: Record) -> str:
    """"alpaca", "chat" or "text", from the record's keys; extra keys (ids, metadata) are ignored.

    A record matching several shapes resolves chat > alpaca > text: the tatsu-lab Alpaca release
    carries a pre-rendered "text" next to instruction/output, and the structured fields are the truth.
    """
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}; "
                         f"accepted shapes: {ACCEPTED_SHAPES}")
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise ValueError(f"record with keys {sorted(record)} matches no known format; "
                     f"accepted shapes: {ACCEPTED_SHAPES}")


def format_alpaca_prompt(record: Record) -> str:
    """The prompt the model sees for an Alpaca record (also what to feed it at generation time)."""
    instruction, inp = record["instruction"], record.get("input") or ""
    if not isinstance(instruction, str) or not isinstance(inp, str):
        raise ValueError("alpaca 'instruction' and 'input' must be strings, got "
                         f"{type(instruction).__name__} and {type(inp).__name__}")
    if inp.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=inp)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _encode(tokenizer, text: str) -> List[int]:
    # Special tokens are placed explicitly by the callers, never by the tokenizer's post-processor.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer) -> List[int]:
    """The BOS to put before alpaca and text examples: the one the tokenizer itself adds, if any.

    A bos_token the tokenizer never adds is not a sequence start the model was trained with:
    SmolLM2 names its ChatML turn opener <|im_start|> as bos_token, GPT-2 names <|endoftext|>.
    Llama, Gemma and Mistral tokenizers add theirs and keep it; Qwen has none."""
    bos = tokenizer.bos_token_id
    if bos is None or list(tokenizer("a", add_special_tokens=True)["input_ids"][:1]) != [bos]:
        return []
    return [bos]


def _eos(tokenizer) -> List[int]:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token, so the model could never learn to stop; "
                         "set tokenizer.eos_token (e.g. '</s>') before building the dataset")
    return [tokenizer.eos_token_id]


def _tokenize_chat(messages: Any, tokenizer) -> Tuple[List[int], List[int]]:
    """Train on assistant turns only; the spans come from rendering growing prefixes of the chat.

    For assistant turn i, render(messages[:i], add_generation_prompt=True) ends where the reply
    starts and render(messages[:i+1]) ends where it stops, so any template works without
    {% generation %} markers, provided its token stream only grows as turns are appended.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"chat 'messages' must be a non-empty list, got {messages!r:.80}")
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"each chat message must be {{'role': one of {CHAT_ROLES}, 'content': str}}, "
                             f"got {m!r:.80}")
    if messages[0]["role"] == "assistant":
        # The reply's start is found by rendering the turns before it, and there are none.
        raise ValueError("a chat example must start with a system or user message, not an assistant one")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("a chat example needs at least one assistant message to train on")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat-format data needs a tokenizer with a chat_template; set "
                         "tokenizer.chat_template or convert the data to the alpaca format")

    def render(msgs: List[Record], generation_prompt: bool) -> List[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return _encode(tokenizer, text)

    input_ids = render(messages, False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = render(messages[:i], True), render(messages[: i + 1], False)
        if input_ids[: len(start)] != start or input_ids[: len(end)] != end:
            raise ValueError("the tokenizer's chat_template is not prefix-stable (the tokens of messages "
                             f"[:{i}] plus the generation prompt, or of messages [:{i + 1}], are not a "
                             "prefix of the tokens of the whole chat), so assistant turns cannot be "
                             "located for loss masking; use a template that only appends as turns are added")
        stop = len(end)
        # Templates put a separator after the turn's end token (ChatML's "\n" after <|im_end|>,
        # Gemma's after <end_of_turn>); the model is never asked to produce it, and at generation
        # time it stops at the end token, so it is not a label.
        while stop > len(start) and not tokenizer.decode(input_ids[stop - 1:stop]).strip():
            stop -= 1
        labels[len(start):stop] = input_ids[len(start):stop]
    return input_ids, labels


def alpaca_to_chat(record: Record) -> List[Record]:
    """An Alpaca record as a user/assistant exchange: instruction (and input, after a blank line) ->
    user, output -> assistant; what fmt="chat" trains on when given Alpaca records."""
    instruction, inp, output = record.get("instruction"), record.get("input") or "", record.get("output")
    if not all(isinstance(v, str) for v in (instruction, inp, output)):
        raise ValueError("alpaca 'instruction', 'input' and 'output' must be strings, got "
                         f"{type(instruction).__name__}, {type(inp).__name__} and {type(output).__name__}")
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _tokenize(record: Record, tokenizer, fmt: Optional[str]) -> Tuple[List[int], List[int]]:
    """(input_ids, labels) of one whole record; see tokenize_example."""
    if fmt not in (None, "auto") + FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; use 'auto' or one of {FORMATS}")
    detected = detect_format(record)
    if fmt == "chat" and detected == "alpaca":
        return _tokenize_chat(alpaca_to_chat(record), tokenizer)
    if fmt not in (None, "auto") and detected != fmt:
        raise ValueError(f"record has the {detected!r} shape but fmt={fmt!r} was requested; "
                         "pass fmt='auto' or fix the record")
    if detected == "alpaca":
        if not isinstance(record.get("output"), str):
            raise ValueError(f"alpaca 'output' must be a string, got {record.get('output')!r:.80}")
        prompt = _bos(tokenizer) + _encode(tokenizer, format_alpaca_prompt(record))
        response = _encode(tokenizer, record["output"]) + _eos(tokenizer)
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response
    if detected == "chat":
        return _tokenize_chat(record.get("messages"), tokenizer)
    if not isinstance(record.get("text"), str):
        raise ValueError(f"text 'text' must be a string, got {record.get('text')!r:.80}")
    input_ids = _bos(tokenizer) + _encode(tokenizer, record["text"]) + _eos(tokenizer)
    return input_ids, list(input_ids)


def tokenize_example(record: Record, tokenizer, max_length: int, fmt: Optional[str] = None) -> Dict[str, List[int]]:
    """{"input_ids", "labels"} for one record, prompt positions masked with -100.

    fmt None or "auto" detects the record's format; a named format must match it, except that
    fmt="chat" also takes Alpaca records, through the tokenizer's chat template (alpaca_to_chat).

    alpaca: bos + prompt + output + eos, loss on output + eos (bos only where the tokenizer adds one
    itself). chat: the chat template's rendering, loss on assistant turns up to and including their
    end token. text: bos + text + eos, loss on everything. Sequences longer than max_length lose
    their tail, which can leave no label at all; build_dataset counts and drops such examples.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    input_ids, labels = _tokenize(record, tokenizer, fmt)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


@dataclass
class LengthReport:
    """What max_length did to a dataset: every example over it was cut (overlong="truncate") or left
    out (overlong="drop"); a cut one with no label left is left out too."""

    records: int
    kept: int
    max_length: int
    overlong: str
    over: int
    """Examples longer than max_length (before cutting)."""
    truncated: int
    """Over-length examples kept with their tail cut off (their last labels and EOS lost)."""
    dropped: int
    """Over-length examples left out: all of them under overlong="drop", else those cut to no label."""
    longest: int
    """Tokens in the longest example before cutting."""


def tokenize_dataset(path: Union[PathLike, Any], tokenizer, max_length: int = 256, fmt: str = "auto",
                     overlong: str = "truncate") -> Tuple[List[Dict[str, List[int]]], LengthReport]:
    """build_dataset's examples and a LengthReport saying how many were over max_length and what
    became of them."""
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; use 'auto' or one of {FORMATS}")
    if overlong not in OVERLONG:
        raise ValueError(f"unknown overlong policy {overlong!r}; use one of {OVERLONG}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    dataset = []
    if isinstance(path, (str, Path)):
        located = _read_records(path)
    else:
        located = _dataset_rows(path, "dataset")
        path = "dataset"
        if not located:
            raise ValueError("the dataset holds no examples")
    over = truncated = longest = 0
    for where, record in located:
        try:
            input_ids, labels = _tokenize(record, tokenizer, fmt)
        except ValueError as err:
            raise ValueError(f"{path}: {where}: {err}") from err
        longest = max(longest, len(input_ids))
        if len(input_ids) > max_length:
            over += 1
            if overlong == "drop":
                continue
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels):
                continue
            truncated += 1
        if any(label != IGNORE_INDEX for label in labels):
            dataset.append({"input_ids": input_ids, "labels": labels})
    report = LengthReport(records=len(located), kept=len(dataset), max_length=max_length, overlong=overlong,
                          over=over, truncated=truncated, dropped=over - truncated, longest=longest)
    if not dataset:
        cause = (f"all of them are longer than max_length={max_length} and overlong='drop' leaves them out"
                 if overlong == "drop" and over == len(located) else
                 f"none has a response token left within max_length={max_length} (prompts fill the whole window)")
        raise ValueError(f"{path}: of its {len(located)} examples, {cause}; raise max_length (the longest "
                         f"example has {longest} tokens) or shorten the prompts")
    return dataset, report


def build_dataset(path: Union[PathLike, Any], tokenizer, max_length: int = 256, fmt: str = "auto",
                  overlong: str = "truncate") -> List[Dict[str, List[int]]]:
    """Tokenize every record of `path` (a file or save_to_disk folder, see SOURCES), or of a
    `datasets.Dataset` / list of records given directly.

    fmt="auto" detects each record's format on its own; naming a format requires every record to
    have that shape (fmt="chat" also renders Alpaca records through the chat template). An example
    longer than max_length keeps its first max_length tokens (overlong="truncate"; one cut to no
    label is dropped) or is left out (overlong="drop"); tokenize_dataset also says how many.
    """
    return tokenize_dataset(path, tokenizer, max_length, fmt, overlong)[0]


def collate(batch: List[Dict[str, List[int]]], pad_token_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, and labels with -100 on padding."""
    assert batch, "collate needs at least one example"
    width = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchIterator:
    """Batches as a pure function of (seed, step): resume needs only the step counter.

    `batch_size` is per rank. The global batch for micro-step `step` holds batch_size * world_size
    examples and rank r takes the r-th contiguous chunk of it, so W ranks at batch_size B see
    exactly the examples a single process sees at batch_size B * W (what parity tests rely on).

    The examples form epochs: epoch e is a permutation of the dataset drawn with a torch.Generator
    seeded with seed + e (as torch's DistributedSampler does), cut into steps_per_epoch global
    batches; the len(dataset) % global-batch examples left over (a different few each epoch) are
    skipped so no global batch repeats an example.
    """

    def __init__(self, dataset: List[Dict[str, List[int]]], batch_size: int, seed: int, pad_token_id: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) < batch_size:
            raise ValueError(f"the dataset has {len(dataset)} examples, fewer than one batch of "
                             f"{batch_size}; lower the batch size or add data")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self._cached: Tuple[int, List[int]] = (-1, [])

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Global batches per pass over the data."""
        global_batch = self.batch_size * world_size
        if len(self.dataset) < global_batch:
            raise ValueError(f"the dataset has {len(self.dataset)} examples, fewer than one global batch "
                             f"(batch_size {self.batch_size} x world_size {world_size} = {global_batch}); "
                             "lower the per-rank batch size or add data")
        return len(self.dataset) // global_batch

    def epoch(self, step: int, world_size: int = 1) -> int:
        """The pass over the data that micro-step `step` belongs to (for logging)."""
        return step // self.steps_per_epoch(world_size)

    def _permutation(self, epoch: int) -> List[int]:
        if self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cached = (epoch, torch.randperm(len(self.dataset), generator=generator).tolist())
        return self._cached[1]

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> List[int]:
        """Dataset indices of this rank's share of the global batch for micro-step `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        per_epoch = self.steps_per_epoch(world_size)
        epoch, within = divmod(step, per_epoch)
        start = (within * world_size + rank) * self.batch_size
        return self._permutation(epoch)[start:start + self.batch_size]

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> Dict[str, torch.Tensor]:
        """This rank's collated batch for global micro-step `step`."""
        return collate([self.dataset[i] for i in self.indices(step, rank, world_size)], self.pad_token_id)
