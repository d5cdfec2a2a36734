"""The data formats users have: OpenAI `messages` and ShareGPT `conversations` with every assistant
turn trained, raw `text`, `data.train_on_inputs`, and a weighted mixture of several data sets.

Masks are checked token by token against transformers' own `return_assistant_tokens_mask` (a chat
template with `{% generation %}` marks), and the formats train together in one real run."""

import json
import math
import shutil

import pytest

from dipnet.pipeline import synthetic
from dipnet.pipeline.data import TokenizedExamples, preprocess, tokenize_rows
from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.recipe import DataSettings

# ChatML, as SmolLM2 and Qwen write it, with the tiny tokenizer's EOS closing each turn; the
# generation marks let transformers say which tokens are the assistant's.
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}\n{% endgeneration %}"
          "{% else %}{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": "5"}, {"role": "user", "content": "And times 4?"},
         {"role": "assistant", "content": "20, since 5 x 4 = 20."}]
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def sharegpt(messages: list[dict]) -> dict:
    return {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages]}


def answers(tok, ex: dict) -> list[str]:
    """The trained stretches of an example, decoded one by one."""
    runs, cur = [], []
    for t, label in zip(ex["input_ids"], ex["labels"]):
        if label != -100:
            assert label == t
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_base_dir)
    t.chat_template = CHATML
    return t


def one(rows, fmt, tok, **kw) -> dict:
    (ex,), _ = tokenize_rows([dict(r, _line=i + 1) for i, r in enumerate(rows)], fmt, tok, 512, "truncate", "c.jsonl", **kw)
    return ex


def test_every_assistant_turn_is_trained_as_transformers_marks_it(tok):
    ex = one([{"messages": CONVO}], "chat", tok)
    hf = tok.apply_chat_template(CONVO, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ex["input_ids"] == list(hf["input_ids"])  # the template's own tokens, nothing appended
    assert [label != -100 for label in ex["labels"]] == [bool(m) for m in hf["assistant_masks"]]
    # (The tiny tokenizer has one token for "\n5": it overlaps the answer, so it counts, as in transformers.)
    assert [a.lstrip("\n") for a in answers(tok, ex)] == ["5</s>\n", "20, since 5 x 4 = 20.</s>\n"]
    # ShareGPT is the same conversation under other names.
    assert one([sharegpt(CONVO)], "sharegpt", tok) == ex
    # A conversation may end on the user: its turns stay trained, nothing is appended after it.
    tail = one([{"messages": CONVO + [{"role": "user", "content": "Thanks"}]}], "chat", tok)
    assert answers(tok, tail) == answers(tok, ex) and tok.decode(tail["input_ids"]).endswith("Thanks</s>\n")
    # train_on_inputs: every token counts.
    assert one([{"messages": CONVO}], "chat", tok, train_on_inputs=True)["labels"] == ex["input_ids"]


def test_a_template_without_eos_gets_one_after_the_last_turn(tok):
    plain = tok.__class__.from_pretrained(tok.name_or_path)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant:{% endif %}")
    ex = one([{"messages": CONVO}], "chat", plain)
    assert ex["input_ids"][-1] == plain.eos_token_id and ex["labels"][-1] == plain.eos_token_id
    assert [a.strip() for a in answers(plain, ex)] == ["5", "20, since 5 x 4 = 20.\n</s>"]


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    # Renders only the last assistant turn (as templates that drop past reasoning do): turn 3's
    # text is not in the whole conversation's, so no mask could be right.
    rewriting = tok.__class__.from_pretrained(tok.name_or_path)
    rewriting.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                               "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(UsageError, match=r"^c.jsonl:1: the tokenizer's chat template does not render turn 3 as a prefix"):
        one([{"messages": CONVO}], "chat", rewriting)


BAD_CONVERSATIONS = [
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
     "c.jsonl:1: 'conversations' has a turn from 'bot' (expected one of system, human, user, gpt, assistant)"),
    ("sharegpt", {"conversations": [{"from": "human", "value": 3}]},
     "c.jsonl:1: 'conversations' must be a list of {from, value} turns with text values"),
    ("chat", {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]},
     "c.jsonl:1: 'messages' must start with a system or user turn and hold an assistant turn"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]},
     "c.jsonl:1: 'messages' must start with a system or user turn and hold an assistant turn"),
    ("text", {"text": ["a"]}, "c.jsonl:1: 'text' must be text, got list"),
    ("text", {"txt": "a"}, "c.jsonl:1: row has no 'text' (format text needs text)"),
]


@pytest.mark.parametrize("fmt,row,message", BAD_CONVERSATIONS, ids=[m[10:50] for _, _, m in BAD_CONVERSATIONS])
def test_bad_rows_name_their_line(tok, fmt, row, message):
    with pytest.raises(UsageError) as e:
        one([row], fmt, tok)
    assert str(e.value) == message


def test_text_and_train_on_inputs_count_every_token(tok):
    ex = one([{"text": "Tom has 3 apples and buys 2 more."}], "text", tok)
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][0] == tok.bos_token_id
    assert ex["input_ids"][-1] == tok.eos_token_id and tok.decode(ex["input_ids"][1:-1]) == "Tom has 3 apples and buys 2 more."
    row = {"question": "What is 2 + 3?", "answer": "#### 5"}
    masked, full = one([row], "gsm8k", tok), one([row], "gsm8k", tok, train_on_inputs=True)
    assert full["input_ids"] == masked["input_ids"] and full["labels"] == full["input_ids"]
    assert answers(tok, masked) == [tok.decode(tok(" #### 5", add_special_tokens=False).input_ids + [tok.eos_token_id])]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_weighted_mixture_keeps_its_shares(tmp_path, tiny_base_dir):
    problems = _write(tmp_path / "problems.jsonl", synthetic.generate_split(30, 5, ood=False))
    texts = [{"text": f"note {i}: numbers add up."} for i in range(10)]
    notes = _write(tmp_path / "notes.jsonl", texts)
    settings = DataSettings(train=[{"path": problems, "weight": 1}, {"path": notes, "weight": 3, "format": "text"}])
    meta = preprocess(settings, tiny_base_dir, tmp_path / "pre")
    # 40 examples in all (what the sources hold together), a quarter from problems and three quarters
    # from notes: notes' 10 rows three times each, problems' 30 undersampled to 10 distinct ones.
    assert [(m["source"], m["format"], m["rows"], m["examples"], m["share"]) for m in meta["mixture"]] == [
        (problems, "gsm8k", 30, 10, 0.25), (notes, "text", 10, 30, 0.75)]
    ex = TokenizedExamples(meta["path"])
    is_note = [bool((ex[i]["labels"] == ex[i]["input_ids"]).all()) for i in range(len(ex))]
    assert len(ex) == 40 and sum(is_note) == 30
    seen = [ex[i]["input_ids"].tolist() for i in range(len(ex)) if is_note[i]]
    assert all(seen.count(s) == 3 for s in seen) and len({tuple(s) for s in seen}) == 10
    assert len({tuple(ex[i]["input_ids"].tolist()) for i in range(len(ex)) if not is_note[i]}) == 10
    assert 0 < sum(is_note[:20]) < 20  # interleaved, not one source after the other
    reweighted = DataSettings(train=[{"path": problems, "weight": 1}, {"path": notes, "weight": 1, "format": "text"}])
    again = preprocess(reweighted, tiny_base_dir, tmp_path / "pre")
    assert again["key"] != meta["key"] and [m["examples"] for m in again["mixture"]] == [20, 20]


def test_chat_sharegpt_and_text_train_together(tmp_path, tiny_base_dir):
    """One real DeepSpeed run on a three-source mixture: OpenAI chat (one and two assistant turns),
    ShareGPT and raw text, each with its own format; the run records the shares it trained on."""
    from trainhelp import metrics, train

    model = tmp_path / "tiny-chat"
    shutil.copytree(tiny_base_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHATML}))
    problems = synthetic.generate_split(24, 9, ood=False)
    chats = [{"messages": [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["answer"]}]
              + ([{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}] if i % 2 else [])}
             for i, p in enumerate(problems[:12])]
    shared = [sharegpt(c["messages"]) for c in chats[:6]]
    texts = [{"text": p["question"] + " " + p["answer"]} for p in problems[12:]]
    sources = [{"path": _write(tmp_path / "chat.jsonl", chats), "weight": 2, "format": "chat"},
               {"path": _write(tmp_path / "sharegpt.jsonl", shared), "weight": 1, "format": "sharegpt"},
               {"path": _write(tmp_path / "text.jsonl", texts), "weight": 1, "format": "text"}]
    out = tmp_path / "run" / "train"
    train(out, {"data.train": sources, "data.max_length": 160, "train.max_steps": 3, "train.zero_stage": 1,
                "launch.launcher": "single"}, procs=1, model_dir=model)
    summary = json.loads((out / "train_summary.json").read_text())
    assert [(m["format"], m["rows"], m["examples"]) for m in summary["data_mixture"]] == [
        ("chat", 12, 15), ("sharegpt", 6, 8), ("text", 12, 7)]
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
