"""The report's statistics on hand-made results: paired differences with their power, the learned
vs fixed noise control, λ drift per layer, harness rows, and the validation/test split note."""

import random

from dipnet.pipeline.report import build_report, render_markdown


def _entry(acc: float, seed: int, lam_end: float | None, n: int = 200):
    rng = random.Random(seed)
    correct = [rng.random() < acc for _ in range(n)]
    samples = {t: [{"correct": {"flexible-extract": c, "strict-match": c}, "answer_nll": 1.0 - 0.5 * c}
                   for c in correct] for t in ("arith-id", "arith-val")}
    score = {"accuracy": sum(correct) / n, "correct": sum(correct), "n": n, "ci95": [0, 1]}
    res = {"tasks": {t: {"n": n, "scores": {"strict-match": score, "flexible-extract": score},
                         "teacher_forced": {"answer_nll": 0.5}} for t in samples},
           "harness": {"dipnet_arith_id": {"exact_match,flexible-extract": sum(correct) / n}}}
    lam = lambda v: {"0.dip_input": {"mean": v, "min": v * 0.9, "max": v * 1.1}}  # noqa: E731
    metrics = [{"step": 1, "step_time_s": 0.1, "tokens_per_s": 1, "peak_mem_mb": 1, "lambda": lam(3e-3)},
               {"step": 2, "step_time_s": 0.1, "tokens_per_s": 1, "peak_mem_mb": 1,
                "lambda": lam(lam_end) if lam_end else {}}]
    if lam_end is None:
        metrics = [{k: v for k, v in m.items() if k != "lambda"} for m in metrics]
    return {"results": res, "samples": samples, "metrics": metrics, "summary": None, "smoothness": None}


def test_report_statistics(tmp_path):
    data = {"sft": {s: _entry(0.5, s, None) for s in range(3)},
            "dip": {s: _entry(0.9, 10 + s, 6e-3) for s in range(3)},
            "dip_fixed": {s: _entry(0.5, 20 + s, 3e-3) for s in range(3)}}
    r = build_report(tmp_path, data=data, resamples=500)
    d = r["differences"]["dip"]["arith-id"]["accuracy"]
    assert 0.3 < d["diff"] < 0.5 and d["ci95"][0] > 0  # a 40-point effect is detected
    assert 0 < d["mde"] < 0.2 and d["seeds_needed"] <= 3
    lf = r["learned_vs_fixed"]["arith-id"]["accuracy"]
    assert lf["ci95"][0] > 0 and abs(lf["diff"] - d["diff"]) < 0.1
    assert r["lambda_drift"]["dip"]["0.dip_input"]["change"] == pytest_approx(1.0)
    assert r["lambda_drift"]["dip_fixed"]["0.dip_input"]["change"] == pytest_approx(0.0)
    assert "sft" not in r["lambda_drift"]
    md = render_markdown(r, [])
    assert "## Learned vs fixed noise" in md and "| dip | 0.dip_input | 0.003 | 0.006 | +100% |" in md
    assert "arith-val: validation split" in md and "arith-id: test splits, untouched by selection" in md
    assert "| dip | dipnet_arith_id | exact_match,flexible-extract |" in md


def pytest_approx(x):
    import pytest

    return pytest.approx(x, abs=1e-9)
