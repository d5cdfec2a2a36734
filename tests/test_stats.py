"""eval/stats.py against the reference implementations: scipy (t distribution, one-sample t,
TOST's one-sided tests) and statsmodels (Holm, TOST)."""

import random

import numpy as np
import pytest
import scipy.stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_paired

from dipnet.eval import stats


@pytest.mark.parametrize("df", [1, 2, 4, 7, 29, 200])
def test_t_distribution_matches_scipy(df):
    for t in (-12.0, -3.1, -1.0, -0.2, 0.0, 0.7, 2.0, 4.5, 30.0):
        assert stats.t_cdf(t, df) == pytest.approx(scipy.stats.t.cdf(t, df), abs=1e-12)
    for p in (0.001, 0.025, 0.3, 0.5, 0.9, 0.975, 0.999):
        assert stats.t_ppf(p, df) == pytest.approx(scipy.stats.t.ppf(p, df), rel=1e-9, abs=1e-9)


def test_paired_t_matches_scipy():
    rng = random.Random(0)
    for n in (2, 3, 5, 8, 20):
        a = [rng.uniform(0.3, 0.7) for _ in range(n)]
        b = [x + rng.gauss(0.02, 0.05) for x in a]
        diffs = [x - y for x, y in zip(a, b)]
        ours = stats.paired_t(diffs)
        ref = scipy.stats.ttest_rel(a, b)
        ci = ref.confidence_interval(0.95)
        assert ours["p"] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-12)
        assert ours["ci"] == pytest.approx([ci.low, ci.high], rel=1e-9)
        assert ours["df"] == n - 1 and ours["seeds"] == n
    assert stats.paired_t([0.1]) is None
    assert stats.paired_t([0.05, 0.05, 0.05])["p"] == 0.0 and stats.paired_t([0.0, 0.0])["p"] == 1.0


def test_holm_matches_statsmodels():
    rng = random.Random(1)
    for m in (1, 2, 5, 12):
        ps = {f"c{i}": rng.random() ** 3 for i in range(m)}
        ours = stats.holm(ps)
        _, ref, _, _ = multipletests(list(ps.values()), method="holm")
        assert [ours[k] for k in ps] == pytest.approx(list(ref), rel=1e-12)


def test_tost_matches_statsmodels():
    rng = random.Random(2)
    for n, shift, margin in ((5, 0.0, 0.05), (8, 0.03, 0.05), (5, 0.1, 0.05), (12, -0.02, 0.03)):
        a = [rng.uniform(0.3, 0.7) for _ in range(n)]
        b = [x - shift + rng.gauss(0, 0.03) for x in a]
        p_ref, _, _ = ttost_paired(np.array(a), np.array(b), -margin, margin)
        assert stats.tost([x - y for x, y in zip(a, b)], margin) == pytest.approx(p_ref, rel=1e-8, abs=1e-12)
