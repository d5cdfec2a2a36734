"""Statistics for comparisons paired by seed (#24 item 5), in plain Python.

A study trains every variant at the same seeds, and a seed fixes the data order and the noise
stream for every variant alike, so the unit of replication is the seed: each comparison is the
per-seed difference in accuracy (variant − other, same seed, same problems), tested with
Student's t on n − 1 degrees of freedom. Across the comparisons a report makes, Holm's step-down
adjustment controls the family-wise error; the one comparison a study declares primary is read
unadjusted. "No difference" is only claimed after an equivalence test (two one-sided t-tests,
TOST, against a declared margin). tests/test_stats.py checks every function against scipy and
statsmodels.
"""

from __future__ import annotations

import math


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    # P(T > |t|), from whichever form keeps its argument away from 1 (where df/(df + t²) rounds
    # to 1.0 for small t and the tail would read exactly 0.5).
    if t * t < df:
        tail = 0.5 * (1.0 - betainc(0.5, df / 2.0, t * t / (df + t * t)))
    else:
        tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The t quantile: the t with t_cdf(t, df) = p (bisection to 1e-12)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def paired_t(diffs: list[float], confidence: float = 0.95) -> dict | None:
    """One-sample t on per-seed paired differences: mean, standard error, the t interval on
    n − 1 degrees of freedom, and the two-sided p-value for a zero mean. None below 2 seeds.
    Identical differences (SE 0) give a zero-width interval and p = 0, or 1 for a zero mean."""
    n = len(diffs)
    if n < 2:
        return None
    m = sum(diffs) / n
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    df = n - 1
    q = t_ppf(1 - (1 - confidence) / 2, df)
    if se == 0:
        p = 1.0 if m == 0 else 0.0
    else:
        p = 2 * (1 - t_cdf(abs(m / se), df))
    return {"diff": m, "se": se, "df": df, "ci": [m - q * se, m + q * se], "p": p, "seeds": n}


def tost(diffs: list[float], margin: float) -> float | None:
    """Equivalence p-value (two one-sided t-tests) for per-seed paired differences: small when
    the mean difference lies within ±margin. None below 2 seeds."""
    n = len(diffs)
    if n < 2 or margin <= 0:
        return None
    m = sum(diffs) / n
    se = math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1)) / math.sqrt(n)
    if se == 0:
        return 0.0 if abs(m) < margin else 1.0
    df = n - 1
    p_lower = 1 - t_cdf((m + margin) / se, df)   # H0: mean ≤ −margin
    p_upper = t_cdf((m - margin) / se, df)       # H0: mean ≥ +margin
    return max(p_lower, p_upper)


def holm(pvalues: dict) -> dict:
    """Holm's step-down adjusted p-values, {name: p} -> {name: adjusted p} (monotone, ≤ 1)."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, running, out = len(order), 0.0, {}
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        out[k] = running
    return out
