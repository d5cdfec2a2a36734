"""Synthetic GSM8K-format arithmetic word problems, deterministic from a seed.

Splits:
- `train` and `test-id`: 1-2 steps, numbers 1-20, templates and names from the training set.
- `test-ood`: 3 steps, larger numbers (start up to 30, results up to 60), templates, names and items never
  used in training problems.

Answers follow GSM8K: one worked line per step, then `#### N`. Every number the model must
write is < 100, and the tiny base's tokenizer holds each of 0..99 as one token, so the base
can learn these sums in pretraining (see `pretraining_corpus`); fine-tuning then teaches the
problem format, which is where a regulariser can help or hurt.

Same seed -> byte-identical JSONL (`write_splits`); test splits never share a question with
train.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ID_NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Kim", "Leo"]
OOD_NAMES = ["Nora", "Omar", "Pia", "Quinn", "Rosa", "Sam"]
PRONOUN = {n: ("she" if n in {"Ann", "Cara", "Eva", "Gina", "Ivy", "Kim", "Nora", "Pia", "Rosa"} else "he")
           for n in ID_NAMES + OOD_NAMES}
ID_ITEMS = ["apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles"]
OOD_ITEMS = ["cookies", "stickers", "rocks", "toys"]

ID_TEMPLATES = {
    "start": ["{Name} has {n} {item}.", "{Name} starts with {n} {item}.", "There are {n} {item} in {Name}'s bag."],
    "add": ["{Pron} buys {n} more.", "{Pron} finds {n} more {item}.", "A friend gives {Name} {n} {item}."],
    "sub": ["{Pron} gives away {n}.", "{Pron} loses {n} {item}.", "{Pron} uses {n} of them."],
    "ask": ["How many {item} does {Name} have now?", "How many {item} are there now?"],
}
OOD_TEMPLATES = {
    "start": ["{Name} owns {n} {item}.", "At first, {Name} keeps {n} {item} in a box."],
    "add": ["Later {pron} collects {n} more {item}.", "{Name} wins {n} extra {item}."],
    "sub": ["Then {pron} sells {n} {item}.", "{Name} hands {n} {item} to a neighbour."],
    "ask": ["What is the number of {item} {Name} has at the end?", "In the end, how many {item} remain?"],
}

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
IRRELEVANT = ["The weather is sunny today.", "The shop opens at nine.", "It is a quiet afternoon.",
              "The bus is late again.", "A cat sleeps by the door."]


def _fill(t: str, name: str, item: str, n: int | None = None) -> str:
    pron = PRONOUN[name]
    return t.format(Name=name, name=name, Pron=pron.capitalize(), pron=pron, item=item, n=n)


def make_problem(rng: random.Random, *, ood: bool) -> dict:
    """One problem as a dict with `question`, `answer` (worked steps + '#### N') and its parts."""
    tpl = OOD_TEMPLATES if ood else ID_TEMPLATES
    name = rng.choice(OOD_NAMES if ood else ID_NAMES)
    item = rng.choice(OOD_ITEMS if ood else ID_ITEMS)
    n_steps = 3 if ood else rng.choice([1, 2])
    start_max, op_max, cap = (30, 15, 60) if ood else (20, 10, 30)
    value = rng.randint(1, start_max)
    sentences = [_fill(rng.choice(tpl["start"]), name, item, value)]
    lines, steps = [], [("start", value)]
    for _ in range(n_steps):
        can_sub = value >= 2
        op = "sub" if (can_sub and (value + 1 > cap or rng.random() < 0.5)) else "add"
        if op == "add":
            n = rng.randint(1, min(op_max, cap - value))
            lines.append(f"{value} + {n} = {value + n}")
            value += n
        else:
            n = rng.randint(1, min(op_max, value - 1))
            lines.append(f"{value} - {n} = {value - n}")
            value -= n
        steps.append((op, n))
        sentences.append(_fill(rng.choice(tpl[op]), name, item, n))
    sentences.append(_fill(rng.choice(tpl["ask"]), name, item))
    answer = "\n".join(lines + [f"#### {value}"])
    return {"question": " ".join(sentences), "answer": answer, "name": name, "item": item,
            "steps": steps, "result": value}


def generate_split(n: int, seed: int, *, ood: bool, exclude: set[str] = frozenset()) -> list[dict]:
    rng = random.Random(seed)
    seen, out = set(exclude), []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n:
            raise RuntimeError(f"could not generate {n} distinct problems (got {len(out)})")
        p = make_problem(rng, ood=ood)
        if p["question"] in seen:
            continue
        seen.add(p["question"])
        out.append({"question": p["question"], "answer": p["answer"]})
    return out


def generate_splits(n_train: int, n_test: int, seed: int) -> dict[str, list[dict]]:
    """train / test-id / test-ood / val; test-id and val never repeat a train question, and
    val never a test-id one. val (for choosing hyper-parameters) comes from its own seed, so
    adding it changed no other split."""
    train = generate_split(n_train, seed, ood=False)
    test_id = generate_split(n_test, seed + 1, ood=False, exclude={r["question"] for r in train})
    test_ood = generate_split(n_test, seed + 2, ood=True)
    val = generate_split(n_test, seed + 3, ood=False,
                         exclude={r["question"] for r in train} | {r["question"] for r in test_id})
    return {"train": train, "test-id": test_id, "test-ood": test_ood, "val": val}


def write_splits(out_dir: str | Path, n_train: int, n_test: int, seed: int) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in generate_splits(n_train, n_test, seed).items():
        p = out_dir / f"{split}.jsonl"
        p.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        paths[split] = p
    return paths


def as_dataset_dict(n_train: int, n_test: int, seed: int):
    """The splits as a `datasets.DatasetDict`, consumed like any other data set."""
    import datasets

    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in generate_splits(n_train, n_test, seed).items()})


# ----------------------------------------------------------------------------- perturbations

def _number_to_words(text: str) -> str:
    import re

    return re.sub(r"\b(\d+)\b", lambda m: NUMBER_WORDS[int(m.group(1))] if int(m.group(1)) < len(NUMBER_WORDS) else m.group(1), text)


def perturb_question(question: str, index: int, *, names: list[str], items: list[str]) -> str:
    """A deterministic, answer-preserving rewrite of one question (chosen by `index`).

    Kinds, cycled by index: an irrelevant sentence inserted; the person's name and the item
    changed; numbers up to twenty written as words.
    """
    kind = index % 3
    rng = random.Random(index)
    if kind == 0:
        parts = question.split(". ")
        at = 1 + rng.randrange(max(1, len(parts) - 1))
        parts.insert(at, rng.choice(IRRELEVANT).rstrip("."))
        return ". ".join(parts)
    if kind == 1:
        out = question
        for old in sorted(set(names), key=len, reverse=True):
            if old in out:
                new = rng.choice([n for n in names if n != old])
                out = out.replace(old, "\0")
                # Keep the pronouns consistent: only swap within the same pronoun group.
                if PRONOUN.get(new) != PRONOUN.get(old):
                    same = [n for n in names if PRONOUN.get(n) == PRONOUN.get(old) and n != old]
                    new = rng.choice(same) if same else old
                out = out.replace("\0", new)
                break
        for old in items:
            if old in out:
                out = out.replace(old, rng.choice([i for i in items if i != old]))
                break
        return out
    return _number_to_words(question)


# ----------------------------------------------------------------------------- pretraining text

def pretraining_corpus(n_docs: int, seed: int) -> list[str]:
    """Text the tiny base is pretrained on: arithmetic chains and short stories.

    The chains cover every a + b and a - b with results in 0..99, so the base learns the sums
    the problems need; the stories use all names and items (ID and OOD) in sentences that are
    not the problem templates, so fine-tuning has something new to teach.
    """
    rng = random.Random(seed)
    names, items = ID_NAMES + OOD_NAMES, ID_ITEMS + OOD_ITEMS
    docs = []
    for _ in range(n_docs):
        parts = []
        value = rng.randint(0, 30)
        for _ in range(rng.randint(5, 9)):
            r = rng.random()
            if r < 0.45:
                # Chains as the answers write them: each result is the next line's first number.
                a = value
            elif r < 0.85:
                # Mostly the small sums the problems need, some up to 99 for the OOD split.
                a = rng.randint(0, 30) if rng.random() < 0.7 else rng.randint(0, 90)
            else:
                name, item = rng.choice(names), rng.choice(items)
                k = rng.randint(1, 40)
                parts.append(rng.choice([
                    f"{name} likes {item}.", f"{name} counts {k} {item}.", f"The {item} belong to {name}.",
                    f"{name} saw {k} {item} yesterday.", f"Some {item} are red and some are blue.",
                    f"{PRONOUN[name].capitalize()} put the {item} on the table.",
                ]))
                continue
            cap = 40 if a <= 30 and rng.random() < 0.7 else 99
            if rng.random() < 0.5 and a < cap:
                b = rng.randint(0, min(20, cap - a))
                value = a + b
                parts.append(f"{a} + {b} = {value}")
            else:
                b = rng.randint(0, min(20, a))
                value = a - b
                parts.append(f"{a} - {b} = {value}")
        docs.append("\n".join(parts))
    return docs
