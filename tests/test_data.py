"""Synthetic data determinism and splits; tokenisation, masking, packing, batch order; bad data."""

import json

import pytest
import torch

from dipnet.pipeline import synthetic
from dipnet.pipeline.data import batch_indices, collate, pack, preprocess, tokenize_rows
from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.recipe import DataSettings


def test_same_seed_byte_identical(tmp_path):
    a = synthetic.write_splits(tmp_path / "a", 100, 50, seed=7)
    b = synthetic.write_splits(tmp_path / "b", 100, 50, seed=7)
    c = synthetic.write_splits(tmp_path / "c", 100, 50, seed=8)
    for split in ("train", "test-id", "test-ood"):
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()


def test_splits_disjoint_and_ood_is_harder():
    s = synthetic.generate_splits(600, 200, 1234)
    train_q = {r["question"] for r in s["train"]}
    assert not train_q & {r["question"] for r in s["test-id"]}
    assert not train_q & {r["question"] for r in s["test-ood"]}
    assert not (train_q | {r["question"] for r in s["test-id"]}) & {r["question"] for r in s["val"]}
    steps = lambda rows: max(r["answer"].count("\n") for r in rows)  # noqa: E731
    assert steps(s["train"]) == 2 and steps(s["test-ood"]) == 3
    # OOD names and templates never appear in training questions.
    for name in synthetic.OOD_NAMES:
        assert not any(name in q for q in train_q)
    for r in s["train"] + s["test-ood"]:
        *_, last = r["answer"].split("#### ")
        lines = r["answer"].split("\n")[:-1]
        assert lines[-1].endswith(f"= {last}")  # worked steps end at the answer


def test_dataset_dict():
    dd = synthetic.as_dataset_dict(20, 10, 3)
    assert set(dd) == {"train", "test-id", "test-ood", "val"} and len(dd["train"]) == 20


@pytest.mark.parametrize("i", range(9))
def test_perturbation_keeps_answer(i):
    rows = synthetic.generate_split(9, 5, ood=False)
    q = rows[i]["question"]
    p = synthetic.perturb_question(q, i, names=synthetic.ID_NAMES, items=synthetic.ID_ITEMS)
    assert p != q
    nums = lambda t: [int(x) for x in __import__("re").findall(r"\d+", t)]  # noqa: E731
    if i % 3 != 2:
        assert nums(p) == nums(q)  # same numbers in the same order: same answer
    else:
        words = [synthetic.NUMBER_WORDS.index(w.strip(".,")) for w in p.split() if w.strip(".,") in synthetic.NUMBER_WORDS]
        assert words + nums(p) and sorted(words + nums(p)) == sorted(nums(q))


def test_tokenize_masks_prompt_and_ends_with_eos(tiny_base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    rows = [{"question": "Ann has 2 pens. How many pens does Ann have now?", "answer": "2 + 0 = 2\n#### 2", "_line": 1}]
    (ex,), truncated = tokenize_rows(rows, "gsm8k", tok, 96, "truncate", "x")
    assert truncated == 0 and ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    n_prompt = len(tok("Question: " + rows[0]["question"] + "\nAnswer:").input_ids)
    assert ex["labels"][:n_prompt] == [-100] * n_prompt and ex["labels"][n_prompt] != -100
    assert tok.decode([t for t in ex["labels"] if t != -100], skip_special_tokens=True).strip() == rows[0]["answer"]
    # Too long: truncated with a count, or refused naming the line.
    (ex2,), tr = tokenize_rows(rows, "gsm8k", tok, 20, "truncate", "x")
    assert tr == 1 and len(ex2["input_ids"]) == 20
    with pytest.raises(UsageError, match=r"x:1: example has \d+ tokens, more than data.max_length=20"):
        tokenize_rows(rows, "gsm8k", tok, 20, "refuse", "x")


def test_formats_and_missing_fields(tiny_base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    ok = {"alpaca": {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
          "prompt_completion": {"prompt": "2 + 3 =", "completion": " 5"}}
    for fmt, row in ok.items():
        (ex,), _ = tokenize_rows([dict(row, _line=1)], fmt, tok, 96, "truncate", "f.jsonl")
        assert ex["labels"][-1] == tok.eos_token_id
    with pytest.raises(UsageError, match=r"f.jsonl:4: row has no 'answer' \(format gsm8k needs question, answer\)"):
        tokenize_rows([{"question": "q", "_line": 4}], "gsm8k", tok, 96, "truncate", "f.jsonl")
    with pytest.raises(UsageError, match="format chat needs a tokenizer with a chat template"):
        tokenize_rows([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "_line": 1}],
                      "chat", tok, 96, "truncate", "f.jsonl")


def test_packing_keeps_labels(tmp_path):
    exs = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]},
           {"input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9]}]
    packed = pack(exs, 5)
    assert [p["input_ids"] for p in packed] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert packed[0]["labels"] == [-100, 2, 3, -100, 5]
    assert packed[0]["position_ids"] == [0, 1, 2, 0, 1] and packed[1]["position_ids"] == [0, 1, 2, 3]
    assert "position_ids" not in pack(exs, 5, cross_document=True)[0]
    from dipnet.pipeline.data import TokenizedExamples, write_examples

    write_examples(packed, tmp_path / "e.safetensors")  # what training reads back
    back = TokenizedExamples(tmp_path / "e.safetensors")
    assert back[0]["position_ids"].tolist() == [0, 1, 2, 0, 1] and back[1]["input_ids"].tolist() == [6, 7, 8, 9]
    batch = collate([back[0], back[1]], 0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # padding: a block of its own
    with pytest.raises(ValueError, match="data.packing_cross_document needs data.packing: true"):
        DataSettings(packing_cross_document=True)


PACK_FAMILIES = ["llama", "qwen2", "mistral", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt2"]


@pytest.mark.parametrize("family", PACK_FAMILIES)
def test_packed_batch_equals_its_examples_one_by_one(family):
    """A packed micro-batch (two rows, padded) has the loss and gradients of its examples run one
    by one: attention stays inside each example and positions restart. Packing that crosses
    examples does not."""
    from conftest import family_configs
    from transformers import AutoModelForCausalLM

    from dipnet.pipeline.data import model_inputs
    from dipnet.pipeline.train import next_token_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_configs()[family], attn_implementation="sdpa").eval()
    gen = torch.Generator().manual_seed(1)
    exs = []
    for n in (6, 9, 5, 7, 4):
        ids = torch.randint(3, 120, (n,), generator=gen).tolist()
        exs.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})

    def loss_and_grads(batches):
        model.zero_grad(set_to_none=True)
        total, count = 0.0, 0
        for b in batches:
            lp, mask = next_token_logprobs(model, b)
            total = total - lp.sum()
            count += int(mask.sum())
        (total / count).backward()
        return (total / count).item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    one_by_one = loss_and_grads([collate([e], 0) for e in exs])
    packed = pack(exs, 16)
    assert len(packed) == 2 and "position_ids" in model_inputs(collate(packed, 0))
    isolated = loss_and_grads([collate(packed, 0)])
    crossing = loss_and_grads([collate(pack(exs, 16, cross_document=True), 0)])
    assert abs(isolated[0] - one_by_one[0]) <= 1e-5, (isolated[0], one_by_one[0])
    assert max((isolated[1][k] - one_by_one[1][k]).abs().max().item() for k in one_by_one[1]) <= 1e-5
    assert abs(crossing[0] - one_by_one[0]) > 1e-4  # the check can tell


def test_batch_order_pure_in_seed_and_step():
    a = batch_indices(50, 3, 17, micro=4, accum=2, rank=1, world=2)
    assert a == batch_indices(50, 3, 17, micro=4, accum=2, rank=1, world=2)
    assert a != batch_indices(50, 4, 17, micro=4, accum=2, rank=1, world=2)
    # One epoch of steps covers every example exactly once across ranks and micro steps.
    seen = [i for step in range(0, 50 // 16 + 1) for r in range(2) for mb in batch_indices(48, 0, step, 4, 2, r, 2) for i in mb]
    assert sorted(seen[:48]) == list(range(48))
    b = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]] and b["labels"][1].tolist() == [5, -100, -100]
    assert torch.equal(b["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))


@pytest.mark.parametrize("content,message", [
    (None, "no such data file"),
    ("", "empty data file"),
    ('{"question": "a", "answer": "b"}\n{"question": oops}\n', ":2: invalid JSON"),
    ('{"question": "a", "answer": "b"}\n{"question": "c"}\n', ":2: row has no 'answer'"),
    ('[1, 2]\n', ":1: expected a JSON object per line"),
])
def test_bad_data_files(tmp_path, tiny_base_dir, content, message):
    p = tmp_path / "train.jsonl"
    if content is not None:
        p.write_text(content)
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        preprocess(DataSettings(train=str(p)), tiny_base_dir, tmp_path / "pre")
    assert not (tmp_path / "pre").exists() or not any((tmp_path / "pre").iterdir())


def test_preprocess_cache_keyed(tmp_path, tiny_base_dir):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in synthetic.generate_split(30, 1, ood=False)))
    m1 = preprocess(DataSettings(train=str(p)), tiny_base_dir, tmp_path / "pre")
    m2 = preprocess(DataSettings(train=str(p)), tiny_base_dir, tmp_path / "pre")
    assert m1 == m2 and m1["examples"] == 30
    m3 = preprocess(DataSettings(train=str(p), max_length=40), tiny_base_dir, tmp_path / "pre")
    assert m3["key"] != m1["key"]
    p.write_text(p.read_text() + json.dumps({"question": "x", "answer": "#### 1"}) + "\n")
    assert preprocess(DataSettings(train=str(p)), tiny_base_dir, tmp_path / "pre")["key"] != m1["key"]


def test_chat_format_with_template_and_parquet(tmp_path, tiny_base_dir):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    row = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": " 5"}], "_line": 1}
    (ex,), _ = tokenize_rows([row], "chat", tok, 96, "truncate", "c.jsonl")
    target = [t for t in ex["labels"] if t != -100]
    assert tok.decode(target, skip_special_tokens=True).strip() == "5" and target[-1] == tok.eos_token_id
    assert "user: What is 2 + 3?" in tok.decode(ex["input_ids"])
    p = tmp_path / "train.parquet"
    datasets.Dataset.from_list(synthetic.generate_split(12, 2, ood=False)).to_parquet(str(p))
    meta = preprocess(DataSettings(train=str(p)), tiny_base_dir, tmp_path / "pre")
    assert meta["examples"] == 12
