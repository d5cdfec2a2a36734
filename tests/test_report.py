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


def test_cost_uses_every_step_without_warmup(tmp_path):
    """The cost table's step time is each run's median over all its steps bar the warm-up ones
    (train_summary.json), then the median over seeds with the seeds' range: a slow first step and a
    slow outlier do not move it, and a garbled summary falls back to the logged steps."""
    from dipnet.pipeline.train import step_time_stats

    st = step_time_stats([(9.0, 100)] + [(1.0, 100)] * 15 + [(1.2, 100)] * 3 + [(50.0, 100)])
    assert st["warmup_excluded"] == 2 and st["steps_timed"] == 18 and st["median_s"] == 1.0
    assert st["p90_s"] == 1.2 and st["tokens_per_s"] == 1800 / (15 * 1.0 + 3 * 1.2 + 50.0 - 1.0)
    assert step_time_stats([]) is None and step_time_stats([(2.0, 10)])["median_s"] == 2.0

    def entries(step_s):
        out = {}
        for s, v in enumerate(step_s):
            e = _entry(0.5, s, None)
            e["summary"] = {"tokens_seen": 1000, "wall_s": 10.0,
                            "step_time": {"median_s": v, "tokens_per_s": 100 / v, "p10_s": v, "p90_s": v}}
            out[s] = e
        return out

    data = {"sft": entries([1.0, 1.1, 0.9]), "dip": entries([1.02, 1.5, 1.04])}
    data["dip"][2]["summary"]["step_time"] = {"median_s": "fast", "tokens_per_s": None}  # hostile: ignored
    r = build_report(tmp_path, data=data, resamples=100)
    assert r["cost"]["sft"]["step_time_s"] == 1.0 and r["cost"]["sft"]["step_time_range_s"] == [0.9, 1.1]
    assert r["cost"]["dip"]["step_time_s"] == 1.02 and r["cost"]["dip"]["step_time_range_s"] == [0.1, 1.5]
    assert "| sft | 1.0000 | 0.9000–1.1000 |" in render_markdown(r, [])


def test_lambda_drift_of_a_deep_model_is_summarised(tmp_path):
    """30 layers would be 30 rows per variant: the markdown shows the first and last three and the
    range of changes over all of them; report.json keeps every layer."""
    def entry(seed):
        e = _entry(0.5, seed, None)
        e["metrics"][0]["lambda"] = {f"{i}.dip_input": {"mean": 3e-3, "min": 3e-3, "max": 3e-3} for i in range(30)}
        e["metrics"][1]["lambda"] = {f"{i}.dip_input": {"mean": 3e-3 * (1 + i / 100), "min": 3e-3, "max": 4e-3}
                                     for i in range(30)}
        return e

    r = build_report(tmp_path, data={"sft": {0: _entry(0.5, 0, None)}, "dip": {0: entry(1)}}, resamples=100)
    assert len(r["lambda_drift"]["dip"]) == 30
    md = render_markdown(r, [])
    assert "| dip | 29.dip_input |" in md and "| dip | 5.dip_input |" not in md
    assert "| dip | … (24 more) | | | +0% … +29% over all 30 | | |" in md


def test_validation_curves_of_every_variant_side_by_side(tmp_path):
    from dipnet.pipeline.report import make_plots

    data = {"sft": {0: _entry(0.5, 0, None)}, "dip": {0: _entry(0.9, 1, 6e-3)}}
    for v in data:
        for row in data[v][0]["metrics"]:
            row["nll"] = 2.0
    r = build_report(tmp_path, data=data, resamples=100)
    assert not any(p.name == "validation.png" for p in make_plots(tmp_path, r, data))  # nothing measured: no plot
    for v, nll in (("sft", 1.2), ("dip", 1.1)):
        data[v][0]["metrics"][1]["val_nll"] = nll
    paths = make_plots(tmp_path, r, data)
    assert (tmp_path / "report" / "validation.png") in paths and (tmp_path / "report" / "validation.png").stat().st_size > 0


def _sampled_entry(frac: float, seed: int, n: int = 40, k: int = 4) -> dict:
    """A sampled eval's results and samples: each problem's share of correct samples and its vote."""
    e = _entry(frac, seed, None, n)
    rng = random.Random(seed)
    for t, rows in e["samples"].items():
        for row in rows:
            share = sum(rng.random() < frac for _ in range(k)) / k
            row["correct"] = {"flexible-extract": share, "strict-match": share}
            row["vote_correct"] = {f"flexible-extract,maj@{k}": share > 0.5, f"strict-match,maj@{k}": share > 0.5}
        e["results"]["tasks"][t]["sampled"] = {
            "n": k, "temperature": 0.7, "metrics": {
                f"flexible-extract,maj@{k}": {"accuracy": sum(r["vote_correct"][f"flexible-extract,maj@{k}"] for r in rows) / n},
                f"flexible-extract,pass@{k}": {"accuracy": 0.9}},
            "diversity": {"distinct_answers": 2.5, "pairwise_token_overlap": 0.4}}
    return e


def test_report_sampled_metrics_and_a_difference_of_nothing(tmp_path):
    """maj@k gets its paired difference beside greedy's, the sampled table its rows; two variants
    with the same per-problem results differ by float noise, which needs no count of seeds."""
    data = {"sft": {s: _sampled_entry(0.4, s) for s in range(3)}, "dip": {s: _sampled_entry(0.4, s) for s in range(3)}}
    r = build_report(tmp_path, data=data, resamples=300)
    same = r["differences"]["dip"]["arith-id"]["accuracy"]
    assert abs(same["diff"]) < 1e-9 and same["seeds_needed"] is None
    assert "arith-id maj@4" in r["differences"]["dip"]
    md = render_markdown(r, [])
    assert "## Sampled answers: self-consistency (maj@k)" in md and "| dip | arith-id | 4, 0.7 | maj@4 |" in md
    row = next(line for line in md.splitlines() if line.startswith("| dip | arith-id | +0.0 |"))
    assert row.split(" | ")[5] == "—"


def test_comparisons_are_paired_by_seed_with_holm_and_tost(tmp_path):
    """Per-seed paired t against scipy's ttest_rel; the primary comparison unadjusted, every other
    Holm-adjusted (statsmodels); equivalence said only when TOST shows it; m trajectories and SAM's
    two passes per step in the FLOPs ratio."""
    import numpy as np
    import scipy.stats
    from statsmodels.stats.multitest import multipletests

    from dipnet.pipeline.recipe import Comparison, ReportSettings

    data = {"sft": {s: _entry(0.5, s, None) for s in range(5)},
            "dip": {s: _entry(0.6, 10 + s, 6e-3) for s in range(5)},
            "dip_matched": {s: _entry(0.6, 10 + s, 6e-3) for s in range(5)},  # dip's results exactly
            "sam": {s: _entry(0.5, 30 + s, None) for s in range(5)}}
    for v, m, opt in (("sft", 1, "adamw"), ("dip", 2, "adamw"), ("dip_matched", 2, "adamw"), ("sam", 1, "sam")):
        for e in data[v].values():
            e["summary"] = {"tokens_seen": 1000, "wall_s": 1.0}
            e["recipe"] = {"dip": {"trajectories": m}, "train": {"optimizer": opt}}
    settings = ReportSettings(primary=Comparison(variant="dip", against="dip_matched", task="arith-id"),
                              compare=[("dip", "sam")], equivalence_margin=0.05)
    r = build_report(tmp_path, data=data, resamples=100, settings=settings)
    c = r["comparisons"]
    acc = lambda v, t: [data[v][s]["results"]["tasks"][t]["scores"]["flexible-extract"]["accuracy"] for s in range(5)]  # noqa: E731
    ref = scipy.stats.ttest_rel(acc("dip", "arith-id"), acc("sft", "arith-id"))
    assert c["dip − sft @ arith-id"]["p"] == pytest_approx(ref.pvalue)
    assert list(c["dip − sft @ arith-id"]["ci"]) == pytest_approx(list(ref.confidence_interval()))
    primary = c["dip − dip_matched @ arith-id"]
    assert primary["primary"] and primary["p_holm"] is None and primary["diff"] == 0
    others = [k for k in c if not c[k]["primary"]]
    assert len(others) == 8  # dip, dip_matched, sam − sft and dip − sam, on two tasks each
    _, holm, _, _ = multipletests(np.array([c[k]["p"] for k in others]), method="holm")
    assert [c[k]["p_holm"] for k in others] == pytest_approx(list(holm))
    assert r["summary"][0].startswith("What 5 seeds can detect (80% power, paired by seed")
    assert r["summary"][1].startswith("Primary comparison (declared in the recipe, read unadjusted): dip − dip_matched")
    assert "equivalent within ±5 points" in r["summary"][1]  # identical results: TOST shows equivalence
    said = {s.split(":")[0]: s for s in r["summary"]}
    assert said["dip − sft @ arith-id"].endswith("the interval excludes zero.")
    assert "not distinguishable from zero, nor shown equivalent within ±5 points" in said["sam − sft @ arith-id"]
    assert r["cost"]["sam"]["relative"]["flops"] == 2.0 and r["cost"]["dip"]["relative"]["flops"] == 2.0
    md = render_markdown(r, [])
    assert "| ★ dip − dip_matched @ arith-id | +0.0 |" in md and "## Paired by seed" in md
