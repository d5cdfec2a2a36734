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
}
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

def format_row(row: dict, fmt: str, tokenizer, where: str) -> tuple[str, str]:
    """(prompt text, completion text) for one row; missing fields name the line."""
    missing = [k for k in REQUIRED[fmt] if row.get(k) in (None, "")]
    if missing:
        raise UsageError(f"{where}:{row.get('_line', '?')}: row has no '{missing[0]}' "
                         f"(format {fmt} needs {', '.join(REQUIRED[fmt])})")
    for k in REQUIRED[fmt] + (("input",) if fmt == "alpaca" and row.get("input") else ()):
        if k != "messages" and (not isinstance(row[k], (str, int, float)) or isinstance(row[k], bool)):
            raise UsageError(f"{where}:{row.get('_line', '?')}: '{k}' must be text, got {type(row[k]).__name__}")
    if fmt == "gsm8k":
        return gsm8k_prompt(row["question"]), " " + str(row["answer"]).strip()
    if fmt == "alpaca":
        inp = row.get("input") or ""
        block = f"### Input:\n{inp}\n\n" if inp else ""
        return ALPACA_PROMPT.format(instruction=row["instruction"], input_block=block), str(row["output"])
    if fmt == "prompt_completion":
        return str(row["prompt"]), str(row["completion"])
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs) \
            or msgs[-1].get("role") != "assistant":
        raise UsageError(f"{where}:{row.get('_line', '?')}: 'messages' must be a list ending with an assistant turn")
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{where}: format chat needs a tokenizer with a chat template")
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    return prompt, str(msgs[-1]["content"])


def tokenize_rows(rows: Iterable[dict], fmt: str, tokenizer, max_length: int, overlength: str,
                  where: str) -> tuple[list[dict], int]:
    """Token ids and labels (prompt masked with -100, EOS appended). Returns (examples, n_truncated)."""
    out, truncated = [], 0
    eos = tokenizer.eos_token_id
    for row in rows:
        prompt, completion = format_row(row, fmt, tokenizer, where)
        p_ids = tokenizer(prompt).input_ids
        if fmt == "chat":  # the template already carries the special tokens it wants
            p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        c_ids = tokenizer(completion, add_special_tokens=False).input_ids + [eos]
        ids, labels = p_ids + c_ids, [-100] * len(p_ids) + c_ids
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

    Returns {'path', 'key', 'examples', 'truncated', 'tokens'}. A cached key is reused as is.
    """
    from dipnet.pipeline.models import load_tokenizer
    from dipnet.pipeline.outputs import is_ours, output_dir

    rows, data_hash = load_rows(data_settings.train, synthetic=data_settings.synthetic)
    if data_settings.limit:
        rows = rows[: data_settings.limit]
    rows, val_rows, val_hash = split_validation(rows, data_settings)
    key_src = json.dumps({"tok": tokenizer_hash(model_dir), "data": data_hash, "format": data_settings.format,
                          "max_length": data_settings.max_length, "packing": data_settings.packing,
                          "cross": data_settings.packing_cross_document, "validation": val_hash,
                          "overlength": data_settings.overlength, "limit": data_settings.limit, "v": 2}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out = Path(out_root) / key
    meta_path = out / "preprocess.json"
    if meta_path.is_file() and is_ours(out):
        return json.loads(meta_path.read_text())
    tok = load_tokenizer(model_dir, trust_remote_code)
    where = data_settings.train if data_settings.train != "synthetic" else "synthetic:train"
    examples, truncated = tokenize_rows(rows, data_settings.format, tok, data_settings.max_length,
                                        data_settings.overlength, where)
    if data_settings.packing:
        examples = pack(examples, data_settings.max_length, cross_document=data_settings.packing_cross_document)
    if not examples:
        raise UsageError(f"{where}: no usable training examples")
    meta = {"path": str(out / EXAMPLES), "key": key, "examples": len(examples), "truncated": truncated,
            "tokens": sum(len(e["input_ids"]) for e in examples), "source": where, "format": data_settings.format}
    val_examples = None
    if val_rows is not None:  # one example per sequence, never packed: each is scored on its own
        val_where = data_settings.validation or f"{where} (validation_fraction {data_settings.validation_fraction})"
        val_examples, _ = tokenize_rows(val_rows, data_settings.format, tok, data_settings.max_length, "truncate",
                                        val_where)
        if not val_examples:
            raise UsageError(f"{val_where}: no usable validation examples")
        meta.update(validation_path=str(out / VALIDATION), validation_examples=len(val_examples))
    with output_dir(out, "preprocess", flag="preprocess directory") as tmp:
        write_examples(examples, tmp / EXAMPLES)
        if val_examples is not None:
            write_examples(val_examples, tmp / VALIDATION)
        (tmp / "preprocess.json").write_text(json.dumps(meta, indent=2))
    return meta


def split_validation(rows: list[dict], data_settings) -> tuple[list[dict], list[dict] | None, str | None]:
    """(training rows, validation rows, a hash of what the validation rows are): data.validation's
    file, or data.validation_fraction of the training rows by a fixed permutation (the rest train);
    no validation rows (None) without either."""
    import torch

    if data_settings.validation is not None:
        val, val_hash = load_rows(data_settings.validation, synthetic=data_settings.synthetic)
        return rows, val, val_hash
    if data_settings.validation_fraction is None:
        return rows, None, None
    n = max(1, round(len(rows) * data_settings.validation_fraction))
    if n >= len(rows):
        raise UsageError(f"data.validation_fraction {data_settings.validation_fraction} of {len(rows)} rows leaves "
                         "none to train on")
    held = set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:n].tolist())
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held],
            f"fraction:{data_settings.validation_fraction}")


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
