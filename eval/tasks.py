"""Evaluation tasks as data: problems, prompt set-up, stop strings.

- `gsm8k`: GSM8K test (`question`/`answer`), prompted as lm-evaluation-harness does:
  n-shot examples from the train split as `Question: {q}\\nAnswer: {a}` joined by a blank line,
  then `Question: {q}\\nAnswer:`; greedy; stop at `Question:`. The shots are one fixed random
  sample of the train split (seed 1234), the same for every question.
- `arith-id`, `arith-ood`: the synthetic test splits (same generator and seed as training).
- `gsm8k-perturbed`, `arith-perturbed`: the same problems rewritten so the answer is unchanged
  (an irrelevant sentence inserted, names and items changed, numbers written as words).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from dipnet.pipeline.readers import read_jsonl
from dipnet.pipeline.errors import UsageError

TASKS = ("gsm8k", "gsm8k-perturbed", "arith-id", "arith-ood", "arith-perturbed")
STOPS = ["Question:", "</s>", "<|im_end|>"]
SHOT_SEED = 1234


def gsm8k_prompt(question: str) -> str:
    """lm-evaluation-harness's gsm8k `doc_to_text` (training uses it too, zero-shot)."""
    return f"Question: {question}\nAnswer:"


@dataclass
class Task:
    name: str
    problems: list[dict]  # {"question", "answer"} (answer as GSM8K writes it, ending '#### N')
    shots: list[dict] = field(default_factory=list)
    stops: list[str] = field(default_factory=lambda: list(STOPS))
    chat_template: bool = False

    def prompt(self, question: str, tokenizer=None) -> str:
        parts = [f"{gsm8k_prompt(s['question'])} {s['answer']}" for s in self.shots]
        text = "\n\n".join(parts + [gsm8k_prompt(question)])
        if self.chat_template:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise UsageError(f"task {self.name}: eval.chat_template needs a tokenizer with a chat template")
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        return text

    def setup(self) -> dict:
        return {"shots": len(self.shots), "shot_seed": SHOT_SEED, "chat_template": self.chat_template,
                "stop": self.stops, "prompt_format": "Question: {question}\\nAnswer:", "fewshot_delimiter": "\\n\\n"}


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
        return read_jsonl(d / "train.jsonl"), read_jsonl(d / "test.jsonl")
    try:
        import datasets

        ds = datasets.load_dataset("openai/gsm8k", "main")
    except Exception as exc:
        raise UsageError("gsm8k: no local copy (eval.gsm8k_path) and the hub is unreachable "
                         f"({str(exc).splitlines()[0][:120]})") from None
    return list(ds["train"]), list(ds["test"])


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


def build_task(name: str, *, shots: int = 0, limit: int | None = None, synthetic_settings=None,
               gsm8k_path: str | None = None, chat_template: bool = False) -> Task:
    """Problems and prompt set-up for one task name."""
    if name not in TASKS:
        raise UsageError(f"unknown task '{name}'; expected one of {', '.join(TASKS)}")
    rng = random.Random(SHOT_SEED)
    if name.startswith("gsm8k"):
        train, test = load_gsm8k(gsm8k_path)
        problems = [{"question": r["question"], "answer": r["answer"]} for r in test]
        if shots > len(train):
            raise UsageError(f"task {name}: {shots} shots asked, the train split has {len(train)} problems")
        shot_rows = rng.sample([{"question": r["question"], "answer": r["answer"]} for r in train], shots) if shots else []
        if name == "gsm8k-perturbed":
            problems = perturb_problems(problems, arithmetic=False)
    else:
        from dipnet.pipeline import synthetic
        from dipnet.pipeline.recipe import SyntheticSettings

        s = synthetic_settings or SyntheticSettings()
        splits = synthetic.generate_splits(s.n_train, s.n_test, s.seed)
        problems = splits["test-ood" if name == "arith-ood" else "test-id"]
        if shots > len(splits["train"]):
            raise UsageError(f"task {name}: {shots} shots asked, the train split has {len(splits['train'])} problems")
        shot_rows = rng.sample(splits["train"], shots) if shots else []
        if name == "arith-perturbed":
            problems = perturb_problems(problems, arithmetic=True)
    if limit:
        problems = problems[:limit]
    return Task(name=name, problems=problems, shots=shot_rows, chat_template=chat_template)


def read_predictions(path: str | Path) -> list[dict]:
    """Rows with `output` and `target` (a samples_<task>.jsonl of an earlier eval works as is)."""
    rows = read_jsonl(path)
    for r in rows:
        for k in ("output", "target"):
            if k not in r:
                raise UsageError(f"{path}:{r['_line']}: row has no '{k}' (expected 'output' and 'target')")
    return rows


def target_of(problem: dict) -> str:
    return problem["answer"]


def dump_jsonl(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
