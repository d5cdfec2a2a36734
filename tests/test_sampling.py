"""Sampled evaluation: pass@k's estimator, majority votes, seeded reproducible samples on both
engines (the votes against lm-eval's own self-consistency filters: test_eval_parity.py)."""

import json
from itertools import combinations

import pytest
import torch
from conftest import cli_in_process

from dipnet.eval.sampling import Sampling, majority_vote, pass_at_k
from dipnet.pipeline.errors import UsageError


@pytest.mark.parametrize("n", [1, 3, 6])
def test_pass_at_k_is_the_chance_over_every_subset(n):
    """Chen et al.'s estimator equals the share of k-subsets of the n samples holding a correct one."""
    for c in range(n + 1):
        ok = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(ok, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets), abs=1e-12)


def test_majority_vote_breaks_ties_by_first_seen_and_checks_its_settings():
    assert majority_vote(["3", "4", "4", "3"]) == "3" and majority_vote(["[invalid]", "5", "5"]) == "5"
    with pytest.raises(UsageError, match="eval.samples 4 needs eval.temperature > 0"):
        Sampling(n=4).check()
    with pytest.raises(UsageError, match=r"eval.k: 8 is not between 1 and eval.samples \(4\)"):
        Sampling(n=4, temperature=0.7, k=(1, 8)).check()


def test_sampled_eval_is_seeded(tmp_path, tiny_base_dir):
    """`dipnet eval --samples 4 --temperature 0.9` on transformers: maj@k, pass@k with intervals and
    diversity in results.json, every completion in the samples file; the same seed gives the same
    samples, another seed other ones (vLLM: test_eval.py, on its shared engine)."""
    runs = {}
    for seed, name in [(0, "hf0"), (0, "hf0b"), (1, "hf1")]:
        res = cli_in_process("eval", tiny_base_dir, "--tasks", "arith-id", "--engine", "hf", "--limit", "6",
                             "--samples", "4", "--temperature", "0.9", "--top-k", "50", "--k", "1,4",
                             "--sampling-seed", seed, "--no-answer-nll", "--out", tmp_path / name)
        assert res.returncode == 0, res.stderr[-2000:]
        runs[name] = [json.loads(line)["outputs"] for line in (tmp_path / name / "samples_arith-id.jsonl").open()]
    assert runs["hf0"] == runs["hf0b"] != runs["hf1"]
    assert all(len(o) == 4 for o in runs["hf0"]) and any(len(set(o)) > 1 for o in runs["hf0"])
    r = json.loads((tmp_path / "hf0" / "results.json").read_text())
    s = r["tasks"]["arith-id"]["sampled"]
    assert r["sampling"] == {"n": 4, "temperature": 0.9, "top_p": 1.0, "top_k": 50, "seed": 0, "k": [1, 4]}
    assert set(s["metrics"]) == {f"{f},{m}@{k}" for f in ("strict-match", "flexible-extract")
                                 for m in ("maj", "pass") for k in (1, 4)}
    for m in s["metrics"].values():
        assert m["ci95"][0] <= m["accuracy"] <= m["ci95"][1]
    p1, p4 = s["metrics"]["flexible-extract,pass@1"]["accuracy"], s["metrics"]["flexible-extract,pass@4"]["accuracy"]
    assert p1 <= p4 and 1 <= s["diversity"]["distinct_answers"] <= 4 and 0 <= s["diversity"]["pairwise_token_overlap"] <= 1


def test_generation_keeps_no_autograd_graph(tiny_base_dir):
    """Greedy and sampled generation run without gradients (a KV cache with an autograd graph grew
    SmolLM2's 20-prompt eval to 24 GB when a decorator slipped to another function)."""
    from dipnet.eval.hf_runner import greedy_generate, load_hf, sample_generate

    model, tok = load_hf(tiny_base_dir)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_grad_enabled()))
    prompts = [tok("Question: 2 + 3?\nAnswer:").input_ids]
    greedy_generate(model, tok, prompts, 4, [])
    sample_generate(model, tok, prompts, 4, [], Sampling(n=2, temperature=1.0))
    assert seen and not any(seen)
