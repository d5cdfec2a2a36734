"""Training data: load rows, format them, tokenise with the prompt masked out, cache.

Formats (the registry users know from LLaMA-Factory and axolotl):
- `gsm8k`: `question`, `answer` -> prompt `Question: {question}\nAnswer:`, completion ` {answer}`
  (the same prompt the evaluation uses, zero-shot);
- `alpaca`: `instruction`, optional `input`, `output`;
- `prompt_completion`: `prompt`, `completion`;
- `chat`: `messages` ([{role, content}, ...], the last one from the assistant), rendered with
  the tokenizer's chat template.
Every completion ends with EOS, so a fine-tuned model stops. Prompt tokens get label -100.

`preprocess(...)` runs before any rank starts (so no collective waits on tokenisation) and
saves `examples.safetensors` (every example's token ids and labels as one flat int32 array,
plus offsets) under a key made of the tokenizer's and the data's content hashes and the
settings that change the tokens. Ranks memory-map it (`TokenizedExamples`): no rank parses or
copies the whole data set, and training needs no `datasets` package.

`batch_indices(...)` makes each rank's batch a pure function of (seed, step): a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from dipnet.eval.tasks import gsm8k_prompt
from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.readers import read_jsonl

REQUIRED = {
    "gsm8k": ("question", "answer"),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


# ----------------------------------------------------------------------------- reading

def load_rows(source: str, *, synthetic=None, split: str = "train") -> tuple[list[dict], str]:
    """Rows and a content hash. `source`: 'synthetic', a .jsonl/.json/.parquet path, or a hub name."""
    if source == "synthetic":
        from dipnet.pipeline import synthetic as syn

        rows = syn.generate_splits(synthetic.n_train, synthetic.n_test, synthetic.seed)[split]
        blob = json.dumps(rows, sort_keys=True).encode()
        return [dict(r, _line=i + 1) for i, r in enumerate(rows)], hashlib.sha256(blob).hexdigest()[:16]
    p = Path(source).expanduser()
    if p.suffix in (".jsonl", ".json") or p.exists():
        if p.suffix == ".parquet":
            return _read_parquet(p)
        rows = read_jsonl(p)
        return rows, _file_hash(p)
    if p.suffix == ".parquet":
        raise UsageError(f"{p}: no such data file")
    try:
        import datasets

        name, _, config = source.partition(":")  # "openai/gsm8k:main" = data set + config
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:
        raise UsageError(f"data.train: cannot load '{source}' (not a local file, and the hub said: "
                         f"{str(exc).splitlines()[0][:160]})") from None
    rows = [dict(r, _line=i + 1) for i, r in enumerate(ds)]
    return rows, hashlib.sha256(f"{source}:{ds._fingerprint}".encode()).hexdigest()[:16]


def _read_parquet(p: Path) -> tuple[list[dict], str]:
    import datasets

    try:
        ds = datasets.Dataset.from_parquet(str(p))
    except Exception as exc:
        raise UsageError(f"{p}: cannot read parquet ({str(exc).splitlines()[0][:160]})") from None
    if len(ds) == 0:
        raise UsageError(f"{p}: empty data file")
    return [dict(r, _line=i + 1) for i, r in enumerate(ds)], _file_hash(p)


def _file_hash(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- formatting

def format_row(row: dict, fmt: str, tokenizer, where: str) -> list[tuple[str, bool]]:
    """One row as text pieces, each marked whether it is an answer (counted in the loss).

    Single-turn formats give [(prompt, False), (completion, True)]; `text` gives [(text, True)];
    chat formats alternate, one answer piece per assistant turn. Missing fields name the line."""
    line = f"{where}:{row.get('_line', '?')}"
    missing = [k for k in REQUIRED[fmt] if row.get(k) in (None, "")]
    if missing:
        raise UsageError(f"{line}: row has no '{missing[0]}' (format {fmt} needs {', '.join(REQUIRED[fmt])})")
    for k in REQUIRED[fmt] + (("input",) if fmt == "alpaca" and row.get("input") else ()):
        if fmt not in ("chat", "sharegpt") and (not isinstance(row[k], (str, int, float)) or isinstance(row[k], bool)):
            raise UsageError(f"{line}: '{k}' must be text, got {type(row[k]).__name__}")
    if fmt == "gsm8k":
        return [(gsm8k_prompt(row["question"]), False), (" " + str(row["answer"]).strip(), True)]
    if fmt == "alpaca":
        inp = row.get("input") or ""
        block = f"### Input:\n{inp}\n\n" if inp else ""
        return [(ALPACA_PROMPT.format(instruction=row["instruction"], input_block=block), False), (str(row["output"]), True)]
    if fmt == "prompt_completion":
        return [(str(row["prompt"]), False), (str(row["completion"]), True)]
    if fmt == "text":
        return [(str(row["text"]), True)]
    msgs = conversation(row, fmt, line)
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{where}: format {fmt} needs a tokenizer with a chat template")
    return chat_pieces(msgs, tokenizer, line)


def conversation(row: dict, fmt: str, line: str) -> list[dict]:
    """OpenAI `messages` ([{role, content}]) or ShareGPT `conversations` ([{from, value}]) as messages."""
    key, role_key, text_key = ("messages", "role", "content") if fmt == "chat" else ("conversations", "from", "value")
    turns = row[key]
    if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get(role_key), str) and isinstance(t.get(text_key), str) for t in turns):
        raise UsageError(f"{line}: '{key}' must be a list of {{{role_key}, {text_key}}} turns with text values")
    if fmt == "sharegpt":
        unknown = [t["from"] for t in turns if t["from"] not in SHAREGPT_ROLES]
        if unknown:
            raise UsageError(f"{line}: 'conversations' has a turn from '{unknown[0][:40]}' "
                             f"(expected one of {', '.join(SHAREGPT_ROLES)})")
        turns = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
    else:
        turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    if not any(t["role"] == "assistant" for t in turns) or turns[0]["role"] == "assistant":
        raise UsageError(f"{line}: '{key}' must start with a system or user turn and hold an assistant turn")
    return turns


def chat_pieces(msgs: list[dict], tokenizer, line: str) -> list[tuple[str, bool]]:
    """The conversation rendered by the tokenizer's chat template, cut at every assistant turn.

    An assistant turn i spans from the end of render(msgs[:i], add_generation_prompt) to the end
    of render(msgs[:i+1]): its content and the template's end-of-turn marker, which is what the
    model must learn to produce. This needs a template that renders a conversation's prefix as a
    prefix of the text (true of ChatML, Llama, Gemma; not of templates that rewrite earlier turns,
    such as ones that drop past reasoning): otherwise the row is refused rather than mis-masked."""
    render = lambda m, gen=False: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(msgs)
    pieces, at = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, through = render(msgs[:i], True), render(msgs[: i + 1])
        if not (through.startswith(before) and full.startswith(through) and len(before) >= at):
            raise UsageError(f"{line}: the tokenizer's chat template does not render turn {i + 1} as a prefix of the "
                             "conversation, so its answer cannot be masked turn by turn (use format prompt_completion)")
        pieces += [(full[at:len(before)], False), (full[len(before):len(through)], True)]
        at = len(through)
    return pieces + [(full[at:], False)]


def tokenize_rows(rows: Iterable[dict], fmt: str, tokenizer, max_length: int, overlength: str,
                  where: str, train_on_inputs: bool = False) -> tuple[list[dict], int]:
    """Token ids and labels, non-answer tokens masked with -100 unless `train_on_inputs`, EOS
    appended when an answer ends the row without one. Returns (examples, n_truncated)."""
    out, truncated = [], 0
    for row in rows:
        pieces = format_row(row, fmt, tokenizer, where)
        if fmt in ("chat", "sharegpt") and getattr(tokenizer, "is_fast", False):
            ids, answer = tokenize_conversation(pieces, tokenizer)
        else:
            ids, answer = tokenize_pieces(pieces, tokenizer, chat=fmt in ("chat", "sharegpt"))
        labels = [t if (a or train_on_inputs) else -100 for t, a in zip(ids, answer)]
        if len(ids) > max_length:
            if overlength == "refuse":
                raise UsageError(f"{where}:{row.get('_line', '?')}: example has {len(ids)} tokens, more than "
                                 f"data.max_length={max_length} (set data.overlength: truncate to cut it)")
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(l == -100 for l in labels):
            continue  # the prompt alone filled max_length: nothing to learn from this row
        out.append({"input_ids": ids, "labels": labels})
    return out, truncated


def tokenize_pieces(pieces: list[tuple[str, bool]], tokenizer, chat: bool) -> tuple[list[int], list[bool]]:
    """Each piece tokenised on its own, as a server tokenises a prompt and then generates the answer:
    the prompt gets the tokenizer's BOS (a chat template writes its own special tokens), and EOS
    follows an answer that ends the row, so a fine-tuned model stops."""
    ids, answer = [], []
    for k, (text, is_answer) in enumerate(pieces):
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=(k == 0 and not chat)).input_ids
        if is_answer and not any(t for t, _ in pieces[k + 1:]) and tokenizer.eos_token_id not in piece:
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        answer += [is_answer] * len(piece)
    return ids, answer


def tokenize_conversation(pieces: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[bool]]:
    """A rendered conversation tokenised whole (the ids `apply_chat_template(tokenize=True)` gives, so
    no piece boundary changes a token), a token counted as answer when its characters overlap an
    assistant turn's, as transformers' `return_assistant_tokens_mask` marks `{% generation %}` spans."""
    text = "".join(t for t, _ in pieces)
    spans, at = [], 0
    for t, is_answer in pieces:
        if is_answer:
            spans.append((at, at + len(t)))
        at += len(t)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    answer = [any(a < e and b > s for s, e in spans) for a, b in enc.offset_mapping]
    (s, e) = spans[-1]
    last_turn = [t for t, (a, b) in zip(ids, enc.offset_mapping) if a < e and b > s]
    if e == len(text) and tokenizer.eos_token_id not in last_turn:
        ids.append(tokenizer.eos_token_id)  # the template ends the last turn without EOS: add one to stop on
        answer.append(True)
    return ids, answer


def pack(examples: list[dict], max_length: int, cross_document: bool = False) -> list[dict]:
    """Concatenate examples into sequences of at most max_length tokens (greedy, in order).

    Each packed sequence carries `position_ids` that restart at 0 for every example: training
    then calls the model without an attention mask, and transformers builds a block-diagonal
    causal mask from them (SDPA/eager), or FlashAttention-2 runs varlen over the same boundaries,
    as `DataCollatorWithFlattening` does. So an example never attends to its neighbours and keeps
    its own positions: a packed micro-batch has the loss of its examples run one by one.
    `cross_document` (explicit opt-in, `data.packing_cross_document`) keeps the old packing:
    attention and positions run on across examples (labels still masked per example).
    """
    keys = ("input_ids", "labels") if cross_document else ("input_ids", "labels", "position_ids")
    packed, cur = [], {k: [] for k in keys}
    for ex in examples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ex["input_ids"]) > max_length:
            packed.append(cur)
            cur = {k: [] for k in keys}
        cur["input_ids"].extend(ex["input_ids"])
        cur["labels"].extend(ex["labels"])
        if not cross_document:
            cur["position_ids"].extend(range(len(ex["input_ids"])))
    if cur["input_ids"]:
        packed.append(cur)
    return packed


def tokenizer_hash(model_dir: str | Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt"):
        p = Path(model_dir) / name
        if p.is_file():
            h.update(name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def preprocess(data_settings, model_dir: str | Path, out_root: str | Path, *, trust_remote_code: bool = False) -> dict:
    """Tokenise the training data once into `out_root/<key>/examples.safetensors`.

    Returns {'path', 'key', 'examples', 'truncated', 'tokens', 'mixture', ...}. A cached key is reused as is.
    """
    from dipnet.pipeline.models import load_tokenizer
    from dipnet.pipeline.outputs import is_ours, output_dir

    sources = []  # (where, format, weight, training rows, validation rows)
    for src in data_settings.sources():
        rows, data_hash = load_rows(src.path, synthetic=data_settings.synthetic)
        if data_settings.limit:
            rows = rows[: data_settings.limit]
        rows, held = split_validation(rows, data_settings)
        where = src.path if src.path != "synthetic" else "synthetic:train"
        sources.append((where, src.format, src.weight, rows, held, data_hash))
    val_rows, val_hash = None, None
    if data_settings.validation is not None:
        val_rows, val_hash = load_rows(data_settings.validation, synthetic=data_settings.synthetic)
    key_src = json.dumps({"tok": tokenizer_hash(model_dir), "data": [(h, f, w) for _, f, w, _, _, h in sources],
                          "max_length": data_settings.max_length, "packing": data_settings.packing,
                          "cross": data_settings.packing_cross_document, "validation": val_hash,
                          "fraction": data_settings.validation_fraction, "inputs": data_settings.train_on_inputs,
                          "overlength": data_settings.overlength, "limit": data_settings.limit, "v": 3}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out = Path(out_root) / key
    meta_path = out / "preprocess.json"
    if meta_path.is_file() and is_ours(out):
        return json.loads(meta_path.read_text())
    tok = load_tokenizer(model_dir, trust_remote_code)
    tokenized, val_examples, truncated = [], [], 0
    for where, fmt, weight, rows, held, _ in sources:
        examples, n_cut = tokenize_rows(rows, fmt, tok, data_settings.max_length, data_settings.overlength, where,
                                        data_settings.train_on_inputs)
        if not examples:
            raise UsageError(f"{where}: no usable training examples")
        tokenized.append(examples)
        truncated += n_cut
        if held is not None:
            val_examples += tokenize_rows(held, fmt, tok, data_settings.max_length, "truncate",
                                          f"{where} (validation_fraction {data_settings.validation_fraction})",
                                          data_settings.train_on_inputs)[0]
    if val_rows is not None:
        val_examples = tokenize_rows(val_rows, data_settings.format, tok, data_settings.max_length, "truncate",
                                     data_settings.validation, data_settings.train_on_inputs)[0]
    examples, counts = mix(tokenized, [w for _, _, w, *_ in sources])
    mixture = [{"source": where, "format": fmt, "weight": weight, "rows": len(rows), "examples": n,
                "share": round(n / len(examples), 6)}
               for (where, fmt, weight, rows, _, _), n in zip(sources, counts)]
    if data_settings.packing:
        examples = pack(examples, data_settings.max_length, cross_document=data_settings.packing_cross_document)
    meta = {"path": str(out / EXAMPLES), "key": key, "examples": len(examples), "truncated": truncated,
            "tokens": sum(len(e["input_ids"]) for e in examples),
            "source": " + ".join(m["source"] for m in mixture), "format": data_settings.format, "mixture": mixture}
    has_validation = val_rows is not None or data_settings.validation_fraction is not None
    if has_validation:  # one example per sequence, never packed: each is scored on its own
        if not val_examples:
            raise UsageError(f"{data_settings.validation or 'data.validation_fraction'}: no usable validation examples")
        meta.update(validation_path=str(out / VALIDATION), validation_examples=len(val_examples))
    with output_dir(out, "preprocess", flag="preprocess directory") as tmp:
        write_examples(examples, tmp / EXAMPLES)
        if has_validation:
            write_examples(val_examples, tmp / VALIDATION)
        (tmp / "preprocess.json").write_text(json.dumps(meta, indent=2))
    return meta


def mix(sources: list[list[dict]], weights: list[float]) -> tuple[list[dict], list[int]]:
    """A weighted mixture of tokenised sources: as many examples as the sources hold together,
    source k contributing its weight's share (largest remainders to round), drawn from a fixed
    permutation of its examples (repeated where the share exceeds its size), then interleaved by a
    fixed permutation. Training walks this list epoch by epoch, so every epoch sees the shares.
    One source is returned as it is."""
    import torch

    if len(sources) == 1:
        return sources[0], [len(sources[0])]
    total, wsum = sum(len(s) for s in sources), sum(weights)
    exact = [total * w / wsum for w in weights]
    counts = [int(x) for x in exact]
    for k in sorted(range(len(exact)), key=lambda k: counts[k] - exact[k])[: total - sum(counts)]:
        counts[k] += 1
    picked = []
    for k, (examples, n) in enumerate(zip(sources, counts)):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(k)).tolist()
        picked += [examples[order[j % len(examples)]] for j in range(n)]
    order = torch.randperm(len(picked), generator=torch.Generator().manual_seed(len(sources))).tolist()
    return [picked[i] for i in order], counts


def split_validation(rows: list[dict], data_settings) -> tuple[list[dict], list[dict] | None]:
    """(training rows, held-out rows): data.validation_fraction of the rows by a fixed permutation
    (seed 0) held out as validation data and the rest to train; (rows, None) without a fraction."""
    import torch

    if data_settings.validation_fraction is None:
        return rows, None
    n = max(1, round(len(rows) * data_settings.validation_fraction))
    if n >= len(rows):
        raise UsageError(f"data.validation_fraction {data_settings.validation_fraction} of {len(rows)} rows leaves "
                         "none to train on")
    held = set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:n].tolist())
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


EXAMPLES = "examples.safetensors"
VALIDATION = "validation.safetensors"  # beside EXAMPLES when the recipe has validation data


def write_examples(examples: list[dict], path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    lengths = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    tensors = {"input_ids": torch.tensor([t for e in examples for t in e["input_ids"]], dtype=torch.int32),
               "labels": torch.tensor([t for e in examples for t in e["labels"]], dtype=torch.int32),
               "offsets": offsets}
    if "position_ids" in examples[0]:  # isolated packing: positions restart per packed example
        tensors["position_ids"] = torch.tensor([t for e in examples for t in e["position_ids"]], dtype=torch.int32)
    save_file(tensors, str(path), metadata={"format": "dipnet-examples-v1"})


class TokenizedExamples:
    """The preprocessed examples, memory-mapped: `ex[i]` -> {'input_ids', 'labels'} (int64 tensors)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        from dipnet.pipeline.models import check_safetensors

        path = Path(path)
        check_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            self.ids, self.labels, self.offsets = f.get_tensor("input_ids"), f.get_tensor("labels"), f.get_tensor("offsets")
            self.positions = f.get_tensor("position_ids") if "position_ids" in f.keys() else None
        n = self.offsets.numel() - 1
        if (n < 1 or int(self.offsets[-1]) != self.ids.numel() or self.labels.numel() != self.ids.numel()
                or (self.positions is not None and self.positions.numel() != self.ids.numel())):
            raise UsageError(f"{path}: inconsistent preprocessed examples (offsets do not match the token arrays)")

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, i: int) -> dict:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ex = {"input_ids": self.ids[a:b].long(), "labels": self.labels[a:b].long()}
        if self.positions is not None:
            ex["position_ids"] = self.positions[a:b].long()
        return ex


# ----------------------------------------------------------------------------- batches

def batch_indices(n: int, seed: int, step: int, micro: int, accum: int, rank: int, world: int) -> list[list[int]]:
    """Example indices for each micro step of optimizer step `step` on `rank`.

    The global stream is epoch after epoch of a permutation seeded by (seed, epoch); optimizer
    step s takes positions [s·G, (s+1)·G) with G = micro·accum·world, split rank-major per micro step.
    Pure in (seed, step): resuming at step s reproduces the same batches.
    """
    import torch

    g = micro * accum * world
    start = step * g
    positions = range(start, start + g)
    perms: dict[int, list[int]] = {}

    def at(pos: int) -> int:
        epoch, off = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        return perms[epoch][off]

    idx = [at(p) for p in positions]
    out = []
    for a in range(accum):
        block = idx[a * micro * world:(a + 1) * micro * world]
        out.append(block[rank * micro:(rank + 1) * micro])
    return out


def collate(examples: list[dict], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding); and position_ids
    for isolated packed examples (the padding gets positions of its own, 0, 1, ...: a block of its
    own that no counted token attends to)."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"])
        labels[i, :n] = torch.as_tensor(e["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "position_ids" in examples[0]:
        pos = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            pos[i, :n] = torch.as_tensor(e["position_ids"])
            pos[i, n:] = torch.arange(width - n)
        batch["position_ids"] = pos
    return batch


def model_inputs(batch: dict) -> dict:
    """What the model is called with: ids and the padding mask, or, for isolated packed
    examples, ids and restarting position ids and no mask (transformers then keeps each example
    to itself; a padding mask, or a KV cache, would switch that off)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
