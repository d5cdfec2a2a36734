"""Pure metric functions: Wilson intervals, paired bootstrap intervals of differences."""

from __future__ import annotations

import math
import random


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well-behaved at 0 and n)."""
    if n == 0:
        return (0.0, 0.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def std(xs):
    xs = list(xs)
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def paired_bootstrap(a: list[list[float]], b: list[list[float]], resamples: int = 2000, seed: int = 0):
    """Difference in mean accuracy between variants a and b with a 95% CI.

    a, b: per-seed lists of per-problem scores (0/1), the same problems in the same order.
    Resamples problems (paired across variants) and seeds; returns (diff, lo, hi).
    """
    rng = random.Random(seed)
    na, nb = len(a), len(b)
    n = len(a[0])
    point = mean(mean(s) for s in a) - mean(mean(s) for s in b)
    diffs = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        sa = [a[rng.randrange(na)] for _ in range(na)]
        sb = [b[rng.randrange(nb)] for _ in range(nb)]
        ma = mean(mean(s[i] for i in idx) for s in sa)
        mb = mean(mean(s[i] for i in idx) for s in sb)
        diffs.append(ma - mb)
    diffs.sort()
    return point, diffs[int(0.025 * resamples)], diffs[min(resamples - 1, int(0.975 * resamples))]
