"""Evaluation tasks as data: problems, prompt set-up, stop strings, answer filters.

GSM8K tasks build exactly the prompts lm-evaluation-harness 0.4.13 builds (tests/test_eval_parity.py
checks it, byte for byte and token for token, against lm-eval's own task objects):

- `gsm8k` (lm-eval `gsm8k`, version 3.0): GSM8K test, `Question: {question}\\nAnswer:`; n shots drawn
  afresh for every question from the train split by one `random.Random(1234)` in document order
  (lm-eval's ContextSampler after `set_fewshot_seed(1234)`), each shot `Question: ...\\nAnswer: {answer}`
  followed by a blank line; stop at `Question:`, `</s>`, `<|im_end|>` and the tokenizer's EOS;
  greedy; 256 new tokens by default. Scores: strict-match `#### (\\-?[0-9\\.\\,]+)`, flexible-extract.
- `gsm8k_cot` (lm-eval `gsm8k_cot`): the 8 fixed chain-of-thought exemplars, `Q: {question}\\nA:`,
  stop at `Q:`; strict-match `The answer is (\\-?[0-9\\.\\,]+).`
- Chat rendering as lm-eval's `--apply_chat_template` (`chat="single"`: the whole few-shot text
  as one user turn) or with `--fewshot_as_multiturn` (`chat="multiturn"`: shots as alternating
  user/assistant turns), through the tokenizer's chat template with a generation prompt.
- Token ids as lm-eval's vLLM backend makes them (`encode_prompt`): the tokenizer's own special
  tokens (its BOS, if it adds one), unless the text already starts with the BOS string (a chat
  template that writes it), so BOS is never doubled.
- `arith-id`, `arith-ood`: the synthetic test splits (same generator and seed as training);
  `arith-val` its validation split. `gsm8k-perturbed`, `arith-perturbed`: the same problems
  rewritten so the answer is unchanged.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.readers import read_jsonl, require_text

TASKS = ("gsm8k", "gsm8k_cot", "gsm8k_cot_self_consistency", "gsm8k-perturbed", "arith-id", "arith-ood", "arith-perturbed", "arith-val")
SHOT_SEED = 1234
GSM8K_STOPS = ["Question:", "</s>", "<|im_end|>"]
COT_STOPS = ["Q:", "</s>", "<|im_end|>"]
FLEXIBLE = (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)
FILTERS = {
    "gsm8k": {"strict-match": (r"#### (\-?[0-9\.\,]+)", 0), "flexible-extract": FLEXIBLE},
    "gsm8k_cot": {"strict-match": (r"The answer is (\-?[0-9\.\,]+).", 0), "flexible-extract": FLEXIBLE},
    # lm-eval's gsm8k-cot-self-consistency.yaml: strict-match is its one regex ("score-first" on the
    # first sample; its maj@64 and maj@8 are eval.samples' maj@k over this filter).
    "gsm8k_cot_self_consistency": {"strict-match": (r"The answer is (\-?[0-9\.\,]*[0-9]+)", 0),
                                   "flexible-extract": FLEXIBLE},
}
DEFAULT_MAX_NEW_TOKENS = 256  # lm-eval's max_gen_toks: the GSM8K tasks' own budget
ARITH_MAX_NEW_TOKENS = 48  # the arithmetic tasks' answers: at most three worked steps, ~30 tokens
PROMPTS_VERSION = "lm-eval-0.4.13"  # part of the eval stage's cache key: new prompts, new results

# lm-eval 0.4.13 tasks/gsm8k/gsm8k-cot.yaml, fewshot_config.samples (sampler first_n).
COT_EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
     "21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, they "
     "had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did Jason "
     "give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, he "
     "had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]


def gsm8k_prompt(question: str) -> str:
    """lm-evaluation-harness's gsm8k `doc_to_text` (training uses it too, zero-shot)."""
    return f"Question: {question}\nAnswer:"


@dataclass
class Task:
    """One evaluation task: its problems and, per problem, the shots that precede it.

    `question_format` renders a question (`{question}`); a shot is the rendered question, the
    `target_delimiter`, its answer and the `fewshot_delimiter` (lm-eval's `Message` turns)."""

    name: str
    problems: list[dict]  # {"question", "answer"} (answer as GSM8K writes it, ending '#### N')
    shot_sets: list[list[dict]] = field(default_factory=list)  # per problem: [{"question", "target"}]
    stops: list[str] = field(default_factory=lambda: list(GSM8K_STOPS))
    question_format: str = "Question: {question}\nAnswer:"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    filters: dict = field(default_factory=lambda: dict(FILTERS["gsm8k"]))
    chat: str | None = None  # None | "single" | "multiturn"
    version: str = "3.0"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # the task's own generation budget (eval.max_new_tokens overrides)

    @property
    def shots(self) -> int:
        return len(self.shot_sets[0]) if self.shot_sets else 0

    def turns(self, i: int) -> list[tuple[str, str, str]]:
        """(role, content, delimiter) turns of problem i's prompt, as lm-eval builds them."""
        turns = []
        for s in (self.shot_sets[i] if self.shot_sets else []):
            turns.append(("user", self.question_format.format(question=s["question"]), self.target_delimiter))
            turns.append(("assistant", s["target"], self.fewshot_delimiter))
        turns.append(("user", self.question_format.format(question=self.problems[i]["question"]), ""))
        return turns

    def prompt(self, i: int, tokenizer=None) -> str:
        turns = self.turns(i)
        if self.chat is None:
            return "".join(c + d for _, c, d in turns)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"task {self.name}: chat rendering needs a tokenizer with a chat template")
        if self.chat == "multiturn":
            messages = [{"role": r, "content": c} for r, c, _ in turns]
        else:  # one user turn holding the whole few-shot text (lm-eval's multiturn_to_singleturn)
            messages = [{"role": "user", "content": "".join(c + d for _, c, d in turns)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def setup(self) -> dict:
        return {"task_version": self.version, "shots": self.shots, "shot_seed": SHOT_SEED,
                "shot_sampling": "first_n" if self.name.startswith("gsm8k_cot") else "per-question random",
                "chat": self.chat, "stop": self.stops, "question_format": self.question_format,
                "fewshot_delimiter": self.fewshot_delimiter, "target_delimiter": self.target_delimiter,
                "filters": {k: v[0] for k, v in self.filters.items()}, "lm_eval": "0.4.13"}


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids as lm-eval's vLLM backend makes them: the tokenizer's special tokens, unless the
    text already starts with the BOS string (a chat template wrote it): BOS never doubled."""
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    bos = tokenizer.decode(bos_id) if bos_id is not None else None
    add = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add).input_ids


def stops_with_eos(task: Task, tokenizer) -> list[str]:
    """The task's stop strings plus the tokenizer's EOS string (lm-eval's handle_stop_sequences)."""
    eos = tokenizer.decode(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else None
    if not eos and getattr(tokenizer, "eos_token", None):
        eos = tokenizer.eos_token
    return task.stops + ([eos] if eos and eos not in task.stops else [])


def default_gsm8k_dir() -> Path | None:
    here = Path(__file__).resolve().parents[1]
    for cand in (here.parent / "shared" / "data" / "gsm8k", Path.cwd().parent / "shared" / "data" / "gsm8k"):
        if (cand / "test.jsonl").is_file():
            return cand
    return None


def load_gsm8k(path: str | Path | None) -> tuple[list[dict], list[dict]]:
    """(train, test) rows from a local directory with train.jsonl/test.jsonl, or the hub."""
    d = Path(path) if path else default_gsm8k_dir()
    if d is not None:
        for split in ("train", "test"):
            if not (d / f"{split}.jsonl").is_file():
                raise UsageError(f"{d}: no {split}.jsonl (expected GSM8K train.jsonl and test.jsonl)")
        return tuple(require_text(read_jsonl(d / f"{split}.jsonl"), d / f"{split}.jsonl", ("question", "answer"))
                     for split in ("train", "test"))
    try:
        import datasets

        ds = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as exc:
        raise UsageError("gsm8k: no local copy (eval.gsm8k_path) and the hub is unreachable "
                         f"({str(exc).splitlines()[0][:120]})") from None
    return tuple(require_text(list(ds[split]), f"openai/gsm8k {split}", ("question", "answer"))
                 for split in ("train", "test"))


def perturb_problems(problems: list[dict], *, arithmetic: bool) -> list[dict]:
    from dipnet.pipeline import synthetic

    out = []
    for i, p in enumerate(problems):
        if arithmetic:
            q = synthetic.perturb_question(p["question"], i, names=synthetic.ID_NAMES + synthetic.OOD_NAMES,
                                           items=synthetic.ID_ITEMS + synthetic.OOD_ITEMS)
        else:
            # GSM8K names and units have no fixed vocabulary: use the two kinds that keep any
            # problem's answer (an irrelevant sentence, small numbers as words).
            q = synthetic.perturb_question(p["question"], 0 if i % 2 == 0 else 2, names=[], items=[])
        out.append({**p, "question": q, "original_question": p["question"]})
    return out


def per_question_shots(pool: list[dict], n_problems: int, shots: int) -> list[list[dict]]:
    """lm-eval's ContextSampler: one Random(1234); for each problem in order, `sample(pool, n)`."""
    rng = random.Random(SHOT_SEED)
    return [[{"question": s["question"], "target": s["answer"]} for s in rng.sample(pool, shots)]
            for _ in range(n_problems)] if shots else []


def build_task(name: str, *, shots: int = 0, limit: int | None = None, synthetic_settings=None,
               gsm8k_path: str | None = None, chat: str | None = None) -> Task:
    """Problems and prompt set-up for one task name.

    Shots are drawn for every problem of the split and then cut to `limit`, as lm-eval draws
    them for the documents it evaluates in order: the first N problems get the same shots
    whatever N is."""
    if name not in TASKS:
        raise UsageError(f"unknown task '{name}'; expected one of {', '.join(TASKS)}")
    if chat not in (None, "single", "multiturn"):
        raise UsageError(f"chat rendering must be none, single or multiturn, got {chat!r}")
    if name.startswith("gsm8k_cot"):
        _, test = load_gsm8k(gsm8k_path)
        problems = [{"question": r["question"], "answer": r["answer"]} for r in test][:limit or None]
        n = shots if shots else len(COT_EXEMPLARS)
        if n > len(COT_EXEMPLARS):
            raise UsageError(f"task gsm8k_cot: {n} shots asked, it has {len(COT_EXEMPLARS)} exemplars")
        fixed = [{"question": q, "target": a} for q, a in COT_EXEMPLARS[:n]]
        if name == "gsm8k_cot_self_consistency":  # its own stops: sampled chains end at a blank line
            return Task(name=name, problems=problems, shot_sets=[fixed] * len(problems), stops=["Q:", "\n\n"],
                        question_format="Q: {question}\nA:", filters=dict(FILTERS[name]), chat=chat, version="2.0")
        return Task(name=name, problems=problems, shot_sets=[fixed] * len(problems), stops=list(COT_STOPS),
                    question_format="Q: {question}\nA:", filters=dict(FILTERS["gsm8k_cot"]), chat=chat)
    if name.startswith("gsm8k"):
        train, test = load_gsm8k(gsm8k_path)
        pool = [{"question": r["question"], "answer": r["answer"]} for r in train]
        problems = [{"question": r["question"], "answer": r["answer"]} for r in test]
        if name == "gsm8k-perturbed":
            problems = perturb_problems(problems, arithmetic=False)
    else:
        from dipnet.pipeline import synthetic
        from dipnet.pipeline.recipe import SyntheticSettings

        s = synthetic_settings or SyntheticSettings()
        splits = synthetic.generate_splits(s.n_train, s.n_test, s.seed)
        pool = splits["train"]
        problems = splits[{"arith-ood": "test-ood", "arith-val": "val"}.get(name, "test-id")]
        if name == "arith-perturbed":
            problems = perturb_problems(problems, arithmetic=True)
    if shots > len(pool):
        raise UsageError(f"task {name}: {shots} shots asked, the train split has {len(pool)} problems")
    shot_sets = per_question_shots(pool, len(problems), shots)
    if limit:
        problems, shot_sets = problems[:limit], shot_sets[:limit]
    return Task(name=name, problems=problems, shot_sets=shot_sets, chat=chat,
                max_new_tokens=DEFAULT_MAX_NEW_TOKENS if name.startswith("gsm8k") else ARITH_MAX_NEW_TOKENS)


def read_predictions(path: str | Path) -> list[dict]:
    """Rows with `output` and `target` (a samples_<task>.jsonl of an earlier eval works as is)."""
    return require_text(read_jsonl(path), path, ("output", "target"), optional=("prompt",), numbers=("target",))


def target_of(problem: dict) -> str:
    return problem["answer"]


def dump_jsonl(rows: list[dict], path: Path) -> None:
    import json

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def compile_filters(filters: dict) -> dict:
    return {k: (re.compile(p), g) for k, (p, g) in filters.items()}
