"""Regenerate the shipped default data and tokenizer, byte for byte.

    python lisa_dist/recipe/assets/make_assets.py            # rewrite the files next to this script
    python lisa_dist/recipe/assets/make_assets.py --out DIR  # write them elsewhere (tests compare the two)

Writes tiny_alpaca.jsonl (the default fine-tuning set), tiny_chat.jsonl and tiny_text.jsonl (so
every data format has an example file) and tokenizer/ (a byte-level BPE trained on all three).
Everything derives from the word lists below and a fixed seed: no download, no clock. The
byte-for-byte check (tests/unit/test_data.py) was set with tokenizers 0.23 and transformers 5.23;
other versions may serialise tokenizer/ differently, in which case rerun this and commit.

The tasks are ones a ~2M-parameter model visibly learns within ~150 steps: fixed templates
(greetings, repeats), memorised facts (capitals, opposites), and character-level transforms and
small arithmetic where the loss falls more slowly.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Dict, List

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lisa_dist.recipe.data import format_alpaca_prompt

SEED = 20240317
TASKS = ("upper", "reverse", "sort", "add", "capital", "greet", "repeat", "count", "next", "opposite")
PER_TASK = 120
VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 512

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Zephyr-style turns without the newline between them: every turn ends with </s>, so an assistant
# reply is exactly content + </s>, and each rendering is a prefix of the next (lisa_dist.recipe.data
# relies on that to find the assistant spans).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('roles must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

WORDS = """
apple river stone cloud green table music light paper horse winter garden silver bread water
ocean dream tiger pencil window summer forest candle rocket castle orange planet button bridge
flower mirror yellow basket finger island jacket kitten ladder lemon magnet needle pillow puzzle
rabbit saddle shadow spider ticket violin wallet zebra anchor banana camera desert engine falcon
guitar hammer igloo jungle kettle lizard marble napkin oyster parrot quartz radio sugar tomato
umbrella velvet walnut yogurt copper dragon feather glove harbor honey lantern meadow orbit
pepper raven salmon thunder valley wagon blanket cactus dolphin cherry coffee travel simple
little quiet happy brave gentle purple bright silent golden frozen hidden
""".split()

NAMES = """
Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Leo Maria Nina Oscar Paul Quinn
Rosa Sam Tina Uma Victor Wendy Xavier Yara Zoe Omar Lena Hugo Ivy Mark Nora Peter Ruth Theo
""".split()

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Argentina": "Buenos Aires",
    "Peru": "Lima", "Chile": "Santiago", "Russia": "Moscow", "Poland": "Warsaw", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Turkey": "Ankara",
    "Australia": "Canberra", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Morocco": "Rabat",
    "Nigeria": "Abuja", "Ghana": "Accra", "Cuba": "Havana", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Switzerland": "Bern", "Iceland": "Reykjavik", "Nepal": "Kathmandu",
    "Indonesia": "Jakarta",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "early": "late", "full": "empty", "hard": "soft", "high": "low", "old": "new",
    "rich": "poor", "strong": "weak", "wet": "dry", "young": "old", "near": "far", "long": "short",
    "loud": "quiet", "thick": "thin", "clean": "dirty", "heavy": "light", "win": "lose", "day": "night",
    "begin": "end", "true": "false", "left": "right", "first": "last", "inside": "outside", "yes": "no",
}


def _alpaca_example(rng: random.Random, task: str) -> Dict[str, str]:
    if task == "upper":
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        return {"instruction": "Convert the text to uppercase.", "input": text, "output": text.upper()}
    if task == "reverse":
        word = rng.choice(WORDS)
        return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}
    if task == "sort":
        digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
        return {"instruction": "Sort the digits in ascending order.", "input": " ".join(digits),
                "output": " ".join(sorted(digits))}
    if task == "add":
        a, b = rng.randint(0, 50), rng.randint(0, 49)
        return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}
    if task == "capital":
        country = rng.choice(sorted(CAPITALS))
        question = rng.choice(["What is the capital of {}?", "Name the capital city of {}."])
        return {"instruction": question.format(country), "input": "",
                "output": f"The capital of {country} is {CAPITALS[country]}."}
    if task == "greet":
        name = rng.choice(NAMES)
        return {"instruction": "Write a greeting for the person.", "input": name,
                "output": f"Hello, {name}! Nice to meet you."}
    if task == "repeat":
        word = rng.choice(WORDS)
        return {"instruction": "Repeat the word three times.", "input": word, "output": f"{word} {word} {word}"}
    if task == "count":
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
        return {"instruction": "Count the words in the sentence.", "input": " ".join(words),
                "output": str(len(words))}
    if task == "next":
        n = rng.randint(0, 98)
        return {"instruction": f"What number comes after {n}?", "input": "", "output": str(n + 1)}
    word = rng.choice(sorted(OPPOSITES))
    return {"instruction": "Give the opposite of the word.", "input": word, "output": OPPOSITES[word]}


def make_alpaca(rng: random.Random) -> List[Dict[str, str]]:
    # Equal shares, drawn with replacement: the fact tasks (40 capitals, 30 opposites, 35 names)
    # repeat a few times each, which is what makes their loss fall within one epoch. Shuffled so
    # any slice of the file (e.g. a held-out tail) has every task.
    records = [_alpaca_example(rng, task) for task in TASKS for _ in range(PER_TASK)]
    rng.shuffle(records)
    return records


def make_chat(rng: random.Random) -> List[Dict[str, object]]:
    records = []
    for i in range(20):
        first, second = (_alpaca_example(rng, rng.choice(TASKS)) for _ in range(2))
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": "You are a helpful assistant. Answer briefly."})
        for ex in (first, second) if i % 2 == 0 else (first,):
            question = ex["instruction"] + (f"\n{ex['input']}" if ex["input"] else "")
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": ex["output"]}]
        records.append({"messages": messages})
    return records


def make_text(rng: random.Random) -> List[Dict[str, str]]:
    countries = rng.sample(sorted(CAPITALS), 10)
    lines = [f"The capital of {c} is {CAPITALS[c]}." for c in countries]
    for word in rng.sample(sorted(OPPOSITES), 5):
        lines.append(f"The opposite of {word} is {OPPOSITES[word]}.")
    for _ in range(5):
        a, b = rng.randint(0, 50), rng.randint(0, 49)
        lines.append(f"{a} plus {b} equals {a + b}.")
    return [{"text": line} for line in lines]


def corpus(alpaca: List[Dict[str, str]], chat: List[Dict[str, object]], text: List[Dict[str, str]]) -> List[str]:
    """The strings the tokenizer trains on: exactly what lisa_dist.recipe.data will feed it."""
    out = [format_alpaca_prompt(r) + r["output"] for r in alpaca]
    out += [m["content"] for r in chat for m in r["messages"]]
    out += [r["text"] for r in text]
    return out


def make_tokenizer(texts: List[str]) -> PreTrainedTokenizerFast:
    special = [PAD, BOS, EOS] + ROLE_TOKENS  # ids 0.. in this order: pad=0, bos=1, eos=2
    bpe = Tokenizer(models.BPE())
    # One token per digit (as Llama does) keeps arithmetic learnable with a 1k vocabulary.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bpe.decoder = decoders.ByteLevel()
    # Plain tokenizer("...") calls get <s> first, as with Llama; lisa_dist.recipe.data adds it itself.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH, padding_side="right", clean_up_tokenization_spaces=False)


def write_jsonl(path: Path, records: List[Dict[str, object]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=True) + "\n")


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory to write into (default: next to this script)")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    alpaca, chat, text = make_alpaca(rng), make_chat(rng), make_text(rng)
    write_jsonl(out / "tiny_alpaca.jsonl", alpaca)
    write_jsonl(out / "tiny_chat.jsonl", chat)
    write_jsonl(out / "tiny_text.jsonl", text)
    make_tokenizer(corpus(alpaca, chat, text)).save_pretrained(str(out / "tokenizer"))


if __name__ == "__main__":
    main()
