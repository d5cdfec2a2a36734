"""Sampled evaluation: n completions per problem, self-consistency (maj@k), pass@k, diversity.

- `maj@k`: the most frequent extracted answer among the first k samples, ties to the one seen
  first (`Counter.most_common`, as lm-eval's `MajorityVoteFilter` votes), scored like a greedy
  answer; an interval by Wilson (one 0/1 per problem).
- `pass@k`: the unbiased estimator of Chen et al. (2021), 1 − C(n−c, k)/C(n, k) from c correct
  among n samples, averaged over problems; a 95% percentile bootstrap interval over problems.
- diversity: distinct extracted answers per problem, and the mean pairwise overlap (Jaccard of
  the generated token-id sets) between a problem's samples: what tells whether a regulariser
  changed how a model explores, not only its greedy answer.
Greedy (`samples 1`, `temperature 0`) stays the default and takes none of this path.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import combinations

from dipnet.eval import extract
from dipnet.eval.metrics import wilson_interval
from dipnet.pipeline.errors import UsageError


@dataclass(frozen=True)
class Sampling:
    n: int = 1  # completions per problem (eval.samples)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0
    k: tuple[int, ...] = ()  # the k of maj@k and pass@k (default 1 and n)

    @property
    def greedy(self) -> bool:
        return self.n == 1 and self.temperature == 0

    @property
    def ks(self) -> list[int]:
        return sorted(set(self.k or (1, self.n)))

    def check(self) -> "Sampling":
        if self.n > 1 and self.temperature == 0:
            raise UsageError(f"eval.samples {self.n} needs eval.temperature > 0 (greedy samples are all the same)")
        bad = [k for k in self.ks if not 1 <= k <= self.n]
        if bad:
            raise UsageError(f"eval.k: {bad[0]} is not between 1 and eval.samples ({self.n})")
        return self

    def record(self) -> dict:
        return {"n": self.n, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, "k": self.ks}


def majority_vote(answers: list[str]) -> str:
    return Counter(answers).most_common(1)[0][0]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021): the chance that at least one of k samples drawn without replacement
    from n, c of them correct, is correct (computed as a product: no large binomials)."""
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def bootstrap_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    import torch

    if not values:
        return [0.0, 0.0]
    x = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(len(values), (resamples, len(values)), generator=torch.Generator().manual_seed(seed))
    means = x[idx].mean(1)
    return [float(means.quantile(0.025)), float(means.quantile(0.975))]


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def score_sampled(task, outputs: list[list[str]], token_ids: list[list[list[int]]], prompts_text: list[str],
                  targets: list[str], sampling: Sampling) -> tuple[dict, list[dict], dict]:
    """(scores, samples, sampled) for n completions per problem. `scores` keeps the greedy
    shape with each problem's fraction of correct samples (pass@1), so reports and paired
    comparisons read it as they read greedy accuracy; `sampled` holds maj@k, pass@k and diversity;
    each sample row keeps every completion, its extractions and each vote."""
    names, n = list(task.filters), sampling.n
    rows, per = [], {f: {"frac": [], **{f"maj@{k}": [] for k in sampling.ks}, **{f"pass@{k}": [] for k in sampling.ks}}
                     for f in names}
    distinct, overlap = [], []
    for outs, ids, ptxt, target in zip(outputs, token_ids, prompts_text, targets):
        scored = [extract.score_output(o, target, task.filters) for o in outs]
        row = {"prompt": ptxt, "outputs": outs, "target": target, "extracted": {}, "correct": {}, "votes": {},
               "vote_correct": {}, "correct_each": {}}
        for f in names:
            ext = [s[f]["extracted"] for s in scored]
            ok = [bool(s[f]["correct"]) for s in scored]
            c = sum(ok)
            row["extracted"][f], row["correct_each"][f] = ext, ok
            row["correct"][f] = c / n
            per[f]["frac"].append(c / n)
            for k in sampling.ks:
                vote = majority_vote(ext[:k])
                hit = vote != extract.INVALID and extract.exact_match(vote, target)
                row["votes"][f"{f},maj@{k}"], row["vote_correct"][f"{f},maj@{k}"] = vote, hit
                per[f][f"maj@{k}"].append(float(hit))
                per[f][f"pass@{k}"].append(pass_at_k(n, c, k))
        distinct.append(len(set(row["extracted"][names[-1]])))
        pairs = list(combinations(ids, 2))
        overlap.append(sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else 1.0)
        rows.append(row)
    m = len(rows)
    scores = {f: {"accuracy": sum(per[f]["frac"]) / m if m else 0.0, "n": m, "samples_per_problem": n,
                  "ci95": bootstrap_interval(per[f]["frac"])} for f in names}
    sampled = {**sampling.record(), "metrics": {}, "diversity": {
        "distinct_answers": sum(distinct) / m if m else 0.0, "filter": names[-1],
        "pairwise_token_overlap": sum(overlap) / m if m else 0.0}}
    for f in names:
        for k in sampling.ks:
            hits = per[f][f"maj@{k}"]
            sampled["metrics"][f"{f},maj@{k}"] = {"accuracy": sum(hits) / m if m else 0.0,
                                                  "ci95": list(wilson_interval(int(sum(hits)), m))}
            p = per[f][f"pass@{k}"]
            sampled["metrics"][f"{f},pass@{k}"] = {"accuracy": sum(p) / m if m else 0.0, "ci95": bootstrap_interval(p)}
    return scores, rows, sampled
