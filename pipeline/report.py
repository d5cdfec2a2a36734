"""The `report` stage (and `dipnet report RUN_DIR`): report.md, report.json and PNG plots.

Everything comes from files already in the run directory (eval results and samples, training
metrics, smoothness), so the report can be regenerated at any time. Per task and variant:
accuracy (both GSM8K scores) and teacher-forced answer NLL as mean ± std over seeds, each
variant's paired difference to the baseline with a bootstrap 95% CI (problems and seeds
resampled), training cost relative to the baseline, and a plain-language summary that states
the sign and size of every effect and whether its CI excludes zero, whatever the result.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

from statistics import median

from dipnet.eval.metrics import mean, paired_bootstrap, std
from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.plots import _plt, read_metrics


def _load_json(p: Path):
    return json.loads(p.read_text()) if p.is_file() else None


def _load_json_or_none(p: Path):
    """A cache file we wrote: None when missing or unreadable (then it is measured again)."""
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None


def _samples(p: Path) -> list[dict]:
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []


def eval_entries(run_dir: Path) -> dict:
    """The eval stage's outputs from the manifest, each name and path checked to lie in run_dir."""
    from dipnet.pipeline.outputs import assert_inside, check_name
    from dipnet.pipeline.run import Manifest

    manifest = Manifest(run_dir)
    evals = manifest.entry("eval").get("outputs") or {}
    if not isinstance(evals, dict):
        raise UsageError(f"{manifest.path}: eval outputs must be a mapping")
    out = {}
    for name, m in evals.items():
        check_name(name, f"{manifest.path}: eval entry")
        if not isinstance(m, dict) or not isinstance(m.get("results"), str) or not isinstance(m.get("variant"), str):
            raise UsageError(f"{manifest.path}: eval entry '{name}' is malformed")
        assert_inside(m["results"], run_dir / "eval", f"{manifest.path}: results of {name}")
        out[name] = m
    return out


def collect(run_dir: Path) -> dict:
    """{variant: {seed: {'results', 'samples': {task: [...]}, 'metrics', 'summary'}}}."""
    out: dict = defaultdict(dict)
    for name, m in eval_entries(run_dir).items():
        d = Path(m["results"]).parent
        res = _load_json(d / "results.json")
        if res is None:
            continue
        entry = {"results": res, "samples": {t: _samples(d / f"samples_{t}.jsonl") for t in res["tasks"]}}
        tdir = run_dir / "train" / name
        entry["metrics"] = read_metrics(tdir / "metrics.jsonl")
        entry["summary"] = _load_json(tdir / "train_summary.json")
        entry["recipe"] = _load_json(tdir / "recipe.json")
        entry["smoothness"] = _load_json(run_dir / "report" / "smoothness" / f"{name}.json")
        out[m["variant"]][m["seed"] if m["seed"] is not None else 0] = entry
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def compute_multiple(recipe: dict | None) -> int:
    """Forward/backward tokens per training token, from the run's recipe.json: m trajectories
    (the batch is repeated m times; tokens_seen counts it once) × SAM's two passes per step."""
    if not isinstance(recipe, dict):
        return 1
    dip, train = recipe.get("dip") or {}, recipe.get("train") or {}
    m = dip.get("trajectories", 1) if isinstance(dip, dict) else 1
    m = m if isinstance(m, int) and not isinstance(m, bool) and m >= 1 else 1
    return m * (2 if isinstance(train, dict) and train.get("optimizer") == "sam" else 1)


def _cost(entries: dict) -> dict:
    """Per variant: the median over seeds of each run's median step time (every step timed, warm-up
    excluded: train_summary.json's `step_time`), the runs' range, tokens/s, memory, wall time.
    Runs from before per-step timing fall back to the logged steps."""
    steps, toks, mems, tokens_seen, walls = [], [], [], [], []
    for e in entries.values():
        st = (e["summary"] or {}).get("step_time")
        rows = [r for r in e["metrics"] if r["step"] > 1]  # step 1 includes warm-up
        if isinstance(st, dict) and all(_finite(st.get(k)) for k in ("median_s", "tokens_per_s")):
            steps.append(st["median_s"])
            toks.append(st["tokens_per_s"])
        elif rows:
            logged = sorted(r["step_time_s"] for r in rows)
            steps.append(logged[len(logged) // 2])
            toks.append(mean(r["tokens_per_s"] for r in rows))
        if rows:
            mems.append(max(r["peak_mem_mb"] for r in rows))
        if e["summary"]:
            tokens_seen.append(e["summary"]["tokens_seen"] * compute_multiple(e.get("recipe")))
            walls.append(e["summary"]["wall_s"])
    return {"step_time_s": median(steps) if steps else None,
            "step_time_range_s": [min(steps), max(steps)] if steps else None,
            "tokens_per_s": median([t for t in toks if t]) if any(toks) else None,
            "peak_mem_mb": mean(mems) if mems else None, "tokens_computed": mean(tokens_seen) if tokens_seen else None,
            "train_wall_s": mean(walls) if walls else None}


def lambda_drift(entries: dict) -> dict:
    """Per layer: mean λ at the first and last logged step (averaged over seeds), the relative
    change, and the spread across features at the end (min, max; over seeds)."""
    per_layer: dict = defaultdict(lambda: {"start": [], "end": [], "min": [], "max": []})
    for e in entries.values():
        lam = [r for r in e["metrics"] if r.get("lambda")]
        if len(lam) < 2:
            continue
        for layer, end in lam[-1]["lambda"].items():
            start = lam[0]["lambda"].get(layer)
            if start:
                d = per_layer[layer]
                d["start"].append(start["mean"]), d["end"].append(end["mean"])
                d["min"].append(end.get("min", end["mean"])), d["max"].append(end.get("max", end["mean"]))
    out = {}
    for layer in sorted(per_layer, key=lambda k: (int(k.split(".")[0]) if k.split(".")[0].isdigit() else 0, k)):
        d = per_layer[layer]
        s0, s1 = mean(d["start"]), mean(d["end"])
        out[layer] = {"start": s0, "end": s1, "change": s1 / s0 - 1 if s0 else None, "end_min": min(d["min"]),
                      "end_max": max(d["max"]), "seeds": len(d["start"])}
    return out


def paired_difference(data: dict, variant: str, baseline: str, task: str, resamples: int, score=None) -> dict | None:
    """variant − baseline on one task: accuracy (flexible-extract; sampled: each problem's share of
    correct samples, or `score` of a sample row, e.g. its maj@k vote) and answer NLL, paired bootstrap
    over problems and seeds, with the minimum detectable effect and the seeds the observed one needs."""
    score = score or (lambda s: s["correct"]["flexible-extract"])
    try:
        a = [[float(score(s)) for s in e["samples"].get(task, [])] for e in data[variant].values()]
        b = [[float(score(s)) for s in e["samples"].get(task, [])] for e in data[baseline].values()]
    except KeyError:
        return None
    if not a or not b or not a[0] or len(a[0]) != len(b[0]):
        return None
    d, lo, hi = paired_bootstrap(a, b, resamples=resamples)
    # Minimum detectable effect (80% power, two-sided 5%): 2.8 standard errors, the SE read off
    # the bootstrap interval; the seeds that would make the observed effect detectable, if the SE
    # shrinks as 1/sqrt(seeds) (seed variance dominating).
    mde = 2.8 * (hi - lo) / 3.92
    # A difference of float noise (the paired sums cancel to ~1e-17) needs no count of seeds: none.
    need = math.ceil(len(a) * (mde / abs(d)) ** 2) if abs(d) > 1e-9 else None
    out = {"accuracy": {"diff": d, "ci95": [lo, hi], "mde": mde, "seeds_needed": need}, "answer_nll": None}
    na = [[s.get("answer_nll") for s in e["samples"][task]] for e in data[variant].values()]
    nb = [[s.get("answer_nll") for s in e["samples"][task]] for e in data[baseline].values()]
    if all(x is not None for row in na + nb for x in row):
        dn, lon, hin = paired_bootstrap(na, nb, resamples=resamples, seed=1)
        out["answer_nll"] = {"diff": dn, "ci95": [lon, hin]}
    return out


def seed_differences(data: dict, variant: str, against: str, task: str) -> list[float] | None:
    """Per seed both variants ran: accuracy(variant) − accuracy(against) on the same problems."""
    try:
        seeds = sorted(set(data[variant]) & set(data[against]))
    except KeyError:
        return None
    out = []
    for seed in seeds:
        a = [float(s["correct"]["flexible-extract"]) for s in data[variant][seed]["samples"].get(task, [])]
        b = [float(s["correct"]["flexible-extract"]) for s in data[against][seed]["samples"].get(task, [])]
        if not a or len(a) != len(b):
            return None
        out.append(mean(a) - mean(b))
    return out or None


def seed_paired_comparisons(data: dict, tasks: list[str], baseline: str, primary=None, compare=(),
                            margin: float = 0.05) -> dict:
    """Every variant − baseline and each `compare` pair, on every task, and the declared primary:
    the per-seed paired t interval (n − 1 df), its p-value, Holm's adjustment over all comparisons
    but the primary, the TOST equivalence p-value against ±margin, and the effect 80% power would
    detect at these seeds ((t_.975 + t_.8)·SE)."""
    from dipnet.eval.stats import holm, paired_t, t_ppf, tost

    pairs = [(v, baseline) for v in data if v not in (baseline, "base")] + [tuple(p) for p in compare]
    wanted = [(v, a, t) for v, a in dict.fromkeys(pairs) for t in tasks]
    if primary is not None and (primary.variant, primary.against, primary.task) not in wanted:
        wanted.append((primary.variant, primary.against, primary.task))
    out = {}
    for v, a, t in wanted:
        diffs = seed_differences(data, v, a, t)
        res = paired_t(diffs) if diffs else None
        if res is None:
            continue
        is_primary = primary is not None and (v, a, t) == (primary.variant, primary.against, primary.task)
        out[f"{v} − {a} @ {t}"] = {**res, "variant": v, "against": a, "task": t, "primary": is_primary,
                                   "tost_p": tost(diffs, margin), "margin": margin,
                                   "mde": (t_ppf(0.975, res["df"]) + t_ppf(0.8, res["df"])) * res["se"],
                                   "per_seed": diffs}
    adjusted = holm({k: c["p"] for k, c in out.items() if not c["primary"]})
    for k, c in out.items():
        c["p_holm"] = None if c["primary"] else adjusted[k]
    return out


def build_report(run_dir: Path, baseline: str = "sft", resamples: int = 2000, data: dict | None = None,
                 settings=None) -> dict:
    """report.json's content. `settings`: the recipe's report section (primary comparison,
    extra pairs, equivalence margin); None compares every variant with the baseline only."""
    data = collect(run_dir) if data is None else data
    tasks = sorted({t for v in data.values() for e in v.values() for t in e["results"]["tasks"]})
    report = {"run_dir": str(run_dir), "baseline": baseline, "tasks": tasks, "variants": {}, "differences": {},
              "cost": {}, "smoothness": {}, "noise_sweep": {}, "harness": {}, "lambda_drift": {}, "sampled": {}}
    for variant, entries in data.items():
        vrep = {}
        for t in tasks:
            per = [e["results"]["tasks"][t] for e in entries.values() if t in e["results"]["tasks"]]
            if not per:
                continue
            vrep[t] = {
                "seeds": len(per), "n": per[0]["n"],
                "strict": {"mean": mean(p["scores"]["strict-match"]["accuracy"] for p in per),
                           "std": std(p["scores"]["strict-match"]["accuracy"] for p in per)},
                "flexible": {"mean": mean(p["scores"]["flexible-extract"]["accuracy"] for p in per),
                             "std": std(p["scores"]["flexible-extract"]["accuracy"] for p in per)},
                "answer_nll": ({"mean": mean(p["teacher_forced"]["answer_nll"] for p in per),
                                "std": std(p["teacher_forced"]["answer_nll"] for p in per)}
                               if all(p.get("teacher_forced") for p in per) else None),
            }
        report["variants"][variant] = vrep
        if variant != "base":
            report["cost"][variant] = _cost(entries)
        sm = [e["smoothness"] for e in entries.values() if e.get("smoothness")]
        if sm:
            report["smoothness"][variant] = {k: mean(s[k] for s in sm) for k in
                                             ("grad_norm", "random_increase", "adversarial_increase", "hessian_trace", "loss")}
        drift = lambda_drift(entries)
        if drift:
            report["lambda_drift"][variant] = drift
        harness = [e["results"]["harness"] for e in entries.values() if e["results"].get("harness")]
        if harness:  # lm-eval's own metrics, one row per task: mean ± std over seeds
            report["harness"][variant] = {
                t: {m: {"mean": mean(h[t][m] for h in harness if t in h), "std": std(h[t][m] for h in harness if t in h),
                        "seeds": sum(t in h for h in harness)} for m in harness[0][t]} for t in harness[0]}
        sampled = {t: [e["results"]["tasks"][t]["sampled"] for e in entries.values()
                       if e["results"]["tasks"].get(t, {}).get("sampled")] for t in tasks}
        if any(sampled.values()):  # maj@k, pass@k and diversity, mean ± std over seeds
            report["sampled"][variant] = {t: {
                "n": runs[0]["n"], "temperature": runs[0]["temperature"], "seeds": len(runs),
                "metrics": {m: {"mean": mean(r["metrics"][m]["accuracy"] for r in runs),
                                "std": std(r["metrics"][m]["accuracy"] for r in runs)}
                            for m in runs[0]["metrics"] if m.startswith("flexible-extract")},
                "distinct_answers": mean(r["diversity"]["distinct_answers"] for r in runs),
                "pairwise_token_overlap": mean(r["diversity"]["pairwise_token_overlap"] for r in runs)}
                for t, runs in sampled.items() if runs}
        sweeps = [e["results"].get("noise_sweep") for e in entries.values() if e["results"].get("noise_sweep")]
        if sweeps:
            report["noise_sweep"][variant] = {t: {s: mean(sw[t][s] for sw in sweeps) for s in sweeps[0][t]} for t in sweeps[0]}
    base_cost = report["cost"].get(baseline)
    for variant, c in report["cost"].items():
        if base_cost:
            c["relative"] = {k: (c[k] / base_cost[k]) if c.get(k) and base_cost.get(k) else None
                             for k in ("step_time_s", "tokens_per_s", "peak_mem_mb", "train_wall_s")}
            # Training FLOPs ≈ 6 · parameters · tokens through forward and backward (same model for
            # every variant; m trajectories and SAM's second pass counted: compute_multiple), so
            # the ratio is the ratio of tokens computed.
            c["relative"]["flops"] = (c["tokens_computed"] / base_cost["tokens_computed"]
                                      if c.get("tokens_computed") and base_cost.get("tokens_computed") else None)
    if baseline in data:
        for variant in data:
            if variant in (baseline, "base"):
                continue
            report["differences"][variant] = {t: d for t in tasks
                                              if (d := paired_difference(data, variant, baseline, t, resamples))}
            for t in tasks:  # self-consistency: the majority vote's correctness per problem, paired the same way
                for key in sorted({k for e in data[variant].values() for s in e["samples"].get(t, [])[:1]
                                   for k in s.get("vote_correct", {}) if k.startswith("flexible-extract")}):
                    d = paired_difference(data, variant, baseline, t, resamples, score=lambda s: s["vote_correct"][key])
                    if d:
                        report["differences"][variant][f"{t} {key.split(',')[1]}"] = d
    # The control that tells learned from fixed noise: the same projections with λ frozen.
    if "dip" in data and "dip_fixed" in data and baseline != "dip_fixed":
        report["learned_vs_fixed"] = {t: d for t in tasks
                                      if (d := paired_difference(data, "dip", "dip_fixed", t, resamples))}
    report["comparisons"] = seed_paired_comparisons(
        data, tasks, baseline, getattr(settings, "primary", None), getattr(settings, "compare", ()),
        getattr(settings, "equivalence_margin", 0.05))
    report["summary"] = summary_sentences(report)
    return report


def _comparison_sentence(key: str, c: dict) -> str:
    lo, hi = c["ci"]
    verdict = ("the interval excludes zero" if lo > 0 or hi < 0 else
               f"equivalent within ±{c['margin'] * 100:.0f} points (TOST p = {c['tost_p']:.3f})"
               if c["tost_p"] is not None and c["tost_p"] < 0.05 else
               f"not distinguishable from zero, nor shown equivalent within ±{c['margin'] * 100:.0f} points "
               f"(TOST p = {c['tost_p']:.2f}); {c['seeds']} seeds detect ±{c['mde'] * 100:.1f}")
    p = f"p = {c['p']:.3f}" + ("" if c["primary"] else f", Holm-adjusted {c['p_holm']:.3f}")
    return (f"{key}: {c['diff'] * 100:+.1f} points, 95% t-interval [{lo * 100:+.1f}, {hi * 100:+.1f}] over "
            f"{c['seeds']} seeds paired by seed ({p}); {verdict}.")


def summary_sentences(report: dict) -> list[str]:
    lines = []
    base = report["baseline"]
    comparisons = report.get("comparisons") or {}
    by_task = defaultdict(list)
    for c in comparisons.values():
        by_task[c["task"]].append(c)
    if by_task:  # what the seeds can detect, before any difference is read
        seeds = max(c["seeds"] for c in comparisons.values())
        lines.append(f"What {seeds} seeds can detect (80% power, paired by seed; median over comparisons): "
                     + ", ".join(f"±{median(c['mde'] for c in cs) * 100:.1f} points on {t}" for t, cs in by_task.items())
                     + ". A smaller true difference would usually be missed.")
    for key, c in comparisons.items():
        if c["primary"]:
            lines.append("Primary comparison (declared in the recipe, read unadjusted): " + _comparison_sentence(key, c))
    for key, c in comparisons.items():
        if not c["primary"]:
            lines.append(_comparison_sentence(key, c))
    paired = {(c["variant"], c["task"]) for c in comparisons.values() if c["against"] == base}
    for variant, per_task in report["differences"].items():
        for t, d in per_task.items():
            if (variant, t) in paired:  # said above, paired by seed; the bootstrap's interval is in the table
                continue
            acc, nll = d["accuracy"], d["answer_nll"]
            excl = acc["ci95"][0] > 0 or acc["ci95"][1] < 0
            sign = "higher" if acc["diff"] > 0 else "lower" if acc["diff"] < 0 else "equal"
            lines.append(
                f"{variant} vs {base} on {t}: accuracy {sign} by {abs(acc['diff']) * 100:.1f} points "
                f"(95% CI {acc['ci95'][0] * 100:+.1f} to {acc['ci95'][1] * 100:+.1f}; "
                f"{'excludes zero' if excl else 'includes zero: not distinguishable from zero'})" + (
                    f"; answer NLL {nll['diff']:+.3f} nats (CI {nll['ci95'][0]:+.3f} to {nll['ci95'][1]:+.3f}"
                    f"{', excludes zero' if nll['ci95'][0] > 0 or nll['ci95'][1] < 0 else ', includes zero'})"
                    if nll else "") + ".")
    for variant, c in report["cost"].items():
        rel = c.get("relative") or {}
        if variant != base and rel.get("step_time_s"):
            lines.append(f"{variant} costs {rel['step_time_s']:.2f}x {base}'s step time and "
                         f"{rel['flops']:.2f}x its training FLOPs." if rel.get("flops") else
                         f"{variant} costs {rel['step_time_s']:.2f}x {base}'s step time.")
    if not lines:
        lines.append("No variant could be compared with the baseline (needs a variant named "
                     f"'{base}' and the same tasks evaluated).")
    return lines


def _fmt(x, pct=True):
    if x is None:
        return "n/a"
    return f"{x * 100:.1f}" if pct else f"{x:.3f}"


def _difference_cells(d: dict) -> str:
    """Δ accuracy, its CI, the detectable effect, the seeds it needs, Δ NLL and its CI (table cells)."""
    a, n = d["accuracy"], d["answer_nll"]
    nll = f"{n['diff']:+.3f} | [{n['ci95'][0]:+.3f}, {n['ci95'][1]:+.3f}]" if n else "— | —"
    need = a.get("seeds_needed")
    return (f"{a['diff'] * 100:+.1f} | [{a['ci95'][0] * 100:+.1f}, {a['ci95'][1] * 100:+.1f}] | "
            f"±{a.get('mde', 0) * 100:.1f} | {'—' if need is None else f'> 10,000' if need > 10_000 else need} | {nll}")


def render_markdown(report: dict, plots: list[Path]) -> str:
    lines = [f"# DIP study report: {Path(report['run_dir']).name}", ""]
    lines += ["## Summary", ""] + [f"- {s}" for s in report["summary"]] + [""]
    lines += ["## Accuracy (flexible-extract / strict-match, %, mean ± std over seeds) and answer NLL", ""]
    val = [t for t in report["tasks"] if t.endswith("-val")]
    if val:
        tests = [t for t in report["tasks"] if t not in val]
        lines += [f"{', '.join(val)}: validation split, the only one hyper-parameters are chosen on"
                  + (f"; {', '.join(tests)}: test splits, untouched by selection." if tests else "."), ""]
    hdr = "| variant | seeds | " + " | ".join(report["tasks"]) + " |"
    lines += [hdr, "|" + "---|" * (len(report["tasks"]) + 2)]
    for v, per in report["variants"].items():
        cells = []
        for t in report["tasks"]:
            r = per.get(t)
            cells.append("—" if r is None else
                         f"{_fmt(r['flexible']['mean'])} ± {_fmt(r['flexible']['std'])} / {_fmt(r['strict']['mean'])}"
                         + (f" · NLL {r['answer_nll']['mean']:.3f} ± {r['answer_nll']['std']:.3f}" if r["answer_nll"] else ""))
        seeds = max((r["seeds"] for r in per.values()), default=0)
        lines.append(f"| {v} | {seeds} | " + " | ".join(cells) + " |")
    lines += ["", f"## Paired difference to `{report['baseline']}` (bootstrap 95% CI over problems and seeds)", "",
              "| variant | task | Δ accuracy (points) | CI | detectable (80% power) | seeds for this Δ | Δ answer NLL | CI |",
              "|---|---|---|---|---|---|---|---|"]
    for v, per in report["differences"].items():
        for t, d in per.items():
            lines.append(f"| {v} | {t} | {_difference_cells(d)} |")
    if report.get("comparisons"):
        margin = next(iter(report["comparisons"].values()))["margin"]
        lines += ["", "## Paired by seed (per-seed accuracy differences, t-interval on n − 1 df)", "",
                  "The seed is the unit: it fixes data order and noise for every variant alike. p-values are "
                  "Holm-adjusted over every comparison but the primary one (marked ★); TOST tests equivalence "
                  f"within ±{margin * 100:.0f} points; 'detectable' is the effect 80% power finds at these seeds.", "",
                  "| comparison | Δ accuracy (points) | 95% CI | p | p (Holm) | TOST p | detectable | seeds |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, c in report["comparisons"].items():
            holm_p = "—" if c["p_holm"] is None else f"{c['p_holm']:.3f}"
            tost_p = "—" if c["tost_p"] is None else f"{c['tost_p']:.3f}"
            lines.append(f"| {'★ ' if c['primary'] else ''}{key} | {c['diff'] * 100:+.1f} | "
                         f"[{c['ci'][0] * 100:+.1f}, {c['ci'][1] * 100:+.1f}] | {c['p']:.3f} | {holm_p} | {tost_p} | "
                         f"±{c['mde'] * 100:.1f} | {c['seeds']} |")
    if report.get("learned_vs_fixed"):
        lines += ["", "## Learned vs fixed noise: `dip` − `dip_fixed` (same projections, λ frozen at init)", "",
                  "| task | Δ accuracy (points) | CI | detectable (80% power) | seeds for this Δ | Δ answer NLL | CI |",
                  "|---|---|---|---|---|---|---|"]
        for t, d in report["learned_vs_fixed"].items():
            lines.append(f"| {t} | {_difference_cells(d)} |")
    lines += ["", "## Cost (relative to the baseline)", "",
              "Step time: median over each run's steps (warm-up excluded), then over seeds; the seeds' range",
              "beside it.", "",
              "| variant | step time (s) | seeds' range | tokens/s | peak mem (MB) | train wall (s) | × step time | × FLOPs |",
              "|---|---|---|---|---|---|---|---|"]
    for v, c in report["cost"].items():
        rel = c.get("relative") or {}
        f = lambda x, d=3: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
        rng = c.get("step_time_range_s")
        lines.append(f"| {v} | {f(c['step_time_s'], 4)} | {f'{rng[0]:.4f}–{rng[1]:.4f}' if rng else 'n/a'} | "
                     f"{f(c['tokens_per_s'], 0)} | {f(c['peak_mem_mb'], 0)} | "
                     f"{f(c['train_wall_s'], 1)} | {f(rel.get('step_time_s'), 2)} | {f(rel.get('flops'), 2)} |")
    if report["smoothness"]:
        lines += ["", "## Smoothness w.r.t. input embeddings (lower is smoother)", "",
                  "| variant | loss | ‖∇L‖ | Δloss random ε | Δloss adversarial ε | Hessian trace |", "|---|---|---|---|---|---|"]
        for v, s in report["smoothness"].items():
            lines.append(f"| {v} | {s['loss']:.3f} | {s['grad_norm']:.4f} | {s['random_increase']:.4f} | "
                         f"{s['adversarial_increase']:.4f} | {s['hessian_trace']:.4f} |")
    if report.get("lambda_drift"):
        lines += ["", "## λ drift per layer (mean over features; first → last logged step, mean over seeds)", "",
                  "| variant | layer | λ start | λ end | change | spread at end (min – max) | seeds |",
                  "|---|---|---|---|---|---|---|"]
        for v, per in report["lambda_drift"].items():
            items = list(per.items())
            if len(items) > 8:  # deep models: first and last layers here, every layer in report.json
                items = items[:3] + [None] + items[-3:]
            for item in items:
                if item is None:
                    changes = [d["change"] for d in per.values() if d["change"] is not None]
                    lines.append(f"| {v} | … ({len(per) - 6} more) | | | "
                                 + (f"{min(changes) * 100:+.0f}% … {max(changes) * 100:+.0f}% over all {len(per)}"
                                    if changes else "n/a") + " | | |")
                    continue
                layer, d = item
                ch = "n/a" if d["change"] is None else f"{d['change'] * 100:+.0f}%"
                lines.append(f"| {v} | {layer} | {d['start']:.3g} | {d['end']:.3g} | {ch} | "
                             f"{d['end_min']:.3g} – {d['end_max']:.3g} | {d['seeds']} |")
    if report.get("lambda_diagnostics"):
        lines += ["", "## What the noise costs and where λ went (final λ, on training batches)", "",
                  "ΔNLL: NLL with the noise − on the mean path (nats; mean ± std over seeds). Cross-seed r: Pearson "
                  "correlation of per-feature ln λ between seeds (1: the same structure every seed; learned λ only). "
                  "ρ(λ, curvature): Spearman, per projection, of λ with the loss's curvature in that feature "
                  "(negative: less noise where the loss is sensitive).", "",
                  "| variant | method | seeds | mean λ | ΔNLL | cross-seed r | ρ(λ, curvature) |", "|---|---|---|---|---|---|---|"]
        f = lambda x, fmt: "—" if x is None else format(x, fmt)  # noqa: E731
        for v, d in report["lambda_diagnostics"].items():
            lines.append(f"| {v} | {d['method']} | {d['seeds']} | {f(d['lambda_mean'], '.3g')} | "
                         f"{d['noise_cost']:.4f} ± {d['noise_cost_std']:.4f} | {f(d['cross_seed_r'], '.2f')} | "
                         f"{f(d['curvature_rho'], '+.2f')} |")
    if report.get("harness"):
        lines += ["", "## lm-evaluation-harness tasks (lm-eval 0.4.13's own metrics, mean ± std over seeds)", "",
                  "| variant | task | metric | value | seeds |", "|---|---|---|---|---|"]
        for v, per in report["harness"].items():
            for t, metrics in per.items():
                for m, x in metrics.items():
                    lines.append(f"| {v} | {t} | {m} | {x['mean']:.4f} ± {x['std']:.4f} | {x['seeds']} |")
    if report.get("sampled"):
        lines += ["", "## Sampled answers: self-consistency (maj@k), pass@k and diversity (flexible-extract, %, "
                  "mean ± std over seeds)", "",
                  "Distinct answers: extracted final answers per problem; overlap: mean Jaccard of the token sets of "
                  "a problem's samples (lower: more varied chains). Paired differences of maj@k are in the table above.",
                  "", "| variant | task | n, T | metric | value | distinct answers | overlap |", "|---|---|---|---|---|---|---|"]
        for v, per in report["sampled"].items():
            for t, r in per.items():
                for m, x in r["metrics"].items():
                    lines.append(f"| {v} | {t} | {r['n']}, {r['temperature']:g} | {m.split(',')[1]} | "
                                 f"{_fmt(x['mean'])} ± {_fmt(x['std'])} | {r['distinct_answers']:.2f} | "
                                 f"{r['pairwise_token_overlap']:.2f} |")
    if report["noise_sweep"]:
        lines += ["", "## Embedding-noise sweep (flexible-extract accuracy, %)", ""]
        for v, per in report["noise_sweep"].items():
            for t, row in per.items():
                lines.append(f"- {v} / {t}: " + ", ".join(f"σ={s}: {a * 100:.1f}" for s, a in row.items()))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](report/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> Path:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(run_dir: Path, report: dict, data: dict) -> list[Path]:
    plt = _plt()
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    variants = list(report["variants"])
    tasks = report["tasks"]
    if variants and tasks:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) * max(1, len(variants)) / 2), 3.8))
        w = 0.8 / len(variants)
        for i, v in enumerate(variants):
            m = [report["variants"][v].get(t, {}).get("flexible", {}).get("mean", 0) * 100 for t in tasks]
            s = [report["variants"][v].get(t, {}).get("flexible", {}).get("std", 0) * 100 for t in tasks]
            ax.bar([j + i * w for j in range(len(tasks))], m, w, yerr=s, capsize=3, label=v)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(tasks))], tasks)
        ax.set_ylabel("flexible-extract accuracy (%)"), ax.legend(fontsize=8), ax.set_title("accuracy (mean ± std over seeds)")
        paths.append(_save(fig, out / "accuracy.png"))
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    any_curve = False
    for v, entries in data.items():
        for seed, e in entries.items():
            if e["metrics"]:
                any_curve = True
                ax[0].plot([r["step"] for r in e["metrics"]], [r["nll"] for r in e["metrics"]], alpha=0.7,
                           label=f"{v} s{seed}")
                lam = [r for r in e["metrics"] if r.get("lambda")]
                if lam:
                    for layer in sorted(lam[0]["lambda"]):
                        ax[1].plot([r["step"] for r in lam], [r["lambda"][layer]["mean"] for r in lam], alpha=0.6,
                                   label=f"{v} s{seed} {layer}" if seed == min(entries) else None)
    if any_curve:
        ax[0].set_xlabel("step"), ax[0].set_ylabel("training NLL"), ax[0].legend(fontsize=6), ax[0].set_title("training curves")
        ax[1].set_xlabel("step"), ax[1].set_ylabel("mean λ"), ax[1].set_title("λ per projection")
        ax[1].set_yscale("log")
        if ax[1].get_legend_handles_labels()[0]:
            ax[1].legend(fontsize=5, ncol=2)
        paths.append(_save(fig, out / "training.png"))
    else:
        plt.close(fig)
    val = {(v, seed): [r for r in e["metrics"] if "val_nll" in r] for v, entries in data.items()
           for seed, e in entries.items()}
    if any(val.values()):  # train.eval_every: every variant's validation curve, side by side
        fig, ax = plt.subplots(figsize=(7, 3.8))
        colours = {v: f"C{i}" for i, v in enumerate(data)}
        for (v, seed), rows in val.items():
            if rows:
                ax.plot([r["step"] for r in rows], [r["val_nll"] for r in rows], marker="o", alpha=0.75,
                        color=colours[v], label=f"{v} s{seed}")
        ax.set_xlabel("step"), ax.set_ylabel("validation answer NLL (mean path)"), ax.legend(fontsize=6)
        ax.set_title("validation during training")
        paths.append(_save(fig, out / "validation.png"))
    if report["noise_sweep"]:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for v, per in report["noise_sweep"].items():
            for t, row in per.items():
                ax.plot([float(s) for s in row], [a * 100 for a in row.values()], marker="o", label=f"{v} / {t}")
        ax.set_xlabel("σ (× embedding RMS)"), ax.set_ylabel("accuracy (%)"), ax.legend(fontsize=7)
        ax.set_title("embedding-noise robustness")
        paths.append(_save(fig, out / "noise_sweep.png"))
    if report["smoothness"]:
        keys = ("grad_norm", "adversarial_increase", "hessian_trace")
        fig, ax = plt.subplots(1, 3, figsize=(11, 3.3))
        vs = list(report["smoothness"])
        for a, k in zip(ax, keys):
            a.bar(vs, [report["smoothness"][v][k] for v in vs])
            a.set_title(k), a.tick_params(axis="x", rotation=30)
        paths.append(_save(fig, out / "smoothness.png"))
    return paths


def write_report(run_dir: str | Path, recipe=None, *, smoothness: bool | None = None) -> dict:
    """Build report.json/report.md/plots from the run directory's stored results."""
    run_dir = Path(run_dir).resolve()
    baseline = recipe.report.baseline if recipe is not None else "sft"
    resamples = recipe.report.bootstrap if recipe is not None else 2000
    do_smooth = smoothness if smoothness is not None else (recipe.report.smoothness if recipe is not None else False)
    if do_smooth:
        _measure_smoothness(run_dir, recipe)
    data = collect(run_dir)  # every results and samples file, read once
    report = build_report(run_dir, baseline, resamples, data, recipe.report if recipe is not None else None)
    plots = make_plots(run_dir, report, data)
    if recipe is None or recipe.report.lambda_diagnostics:
        diag = measure_lambda_diagnostics(run_dir, recipe)
        report["lambda_diagnostics"] = diag["variants"]
        plots += plot_lambda_histograms(run_dir, diag["states"])
    report["plots"] = [str(p) for p in plots]
    for name, text in (("report.json", json.dumps(report, indent=2)), ("report.md", render_markdown(report, plots))):
        tmp = run_dir / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)
    return {"report_md": str(run_dir / "report.md"), "report_json": str(run_dir / "report.json"),
            "plots": [str(p) for p in plots]}


def _measure_smoothness(run_dir: Path, recipe) -> None:
    from dipnet.eval.evaluate import model_fingerprint
    from dipnet.pipeline.smoothness import measure_smoothness

    out = run_dir / "report" / "smoothness"
    out.mkdir(parents=True, exist_ok=True)
    roots = _model_dir_roots(run_dir, recipe)
    for name, m in eval_entries(run_dir).items():
        _checked_model_dir(run_dir, name, m, roots)
        p = out / f"{name}.json"
        fp = model_fingerprint(m["model_dir"])
        if p.is_file() and json.loads(p.read_text()).get("fingerprint") == fp:
            continue
        res = measure_smoothness(m["model_dir"], synthetic_settings=recipe.data.synthetic if recipe else None)
        p.write_text(json.dumps({**res, "fingerprint": fp}, indent=2))


def _model_dir_roots(run_dir: Path, recipe) -> list[Path]:
    from dipnet.pipeline.base_model import cache_root

    # Models are loaded only from the run directory, the base-model cache or the recipe's base.
    roots = [run_dir.resolve(), (cache_root() / "base").resolve()]
    if recipe is not None and Path(recipe.model.base).expanduser().is_dir():
        roots.append(Path(recipe.model.base).expanduser().resolve())
    return roots


def _checked_model_dir(run_dir: Path, name: str, m: dict, roots: list[Path]) -> Path:
    md = Path(str(m.get("model_dir"))).resolve()
    if not any(md == r or r in md.parents for r in roots):
        raise UsageError(f"{run_dir / 'manifest.json'}: model_dir of {name} ({md}) is outside the run directory")
    return md


NOISE_METHODS = ("dip", "dip_fixed", "dip_matched", "dip_shuffled")


def measure_lambda_diagnostics(run_dir: Path, recipe, batches: int = 4) -> dict:
    """Per variant with DIP projections (dip, dip_fixed and the controls): the NLL the noise of
    its final λ costs on training batches (ΔNLL), and for learned λ how alike the seeds' per-
    feature ln λ are (Pearson, mean over pairs of seeds and over projections) and how λ follows
    the loss's curvature (Spearman ρ(λ, h) per projection, mean; negative: less noise where the
    loss is more sensitive). One JSON per model under report/dip/ (reused while the model is unchanged)."""
    import torch

    from dipnet.eval.evaluate import model_fingerprint
    from dipnet.pipeline.dip import read_dip_config, read_dip_state
    from dipnet.pipeline.dip_diagnostics import (cross_seed_correlation, noise_cost_and_curvature, spearman,
                                                 training_batches)
    from dipnet.pipeline.models import load_causal_lm, load_tokenizer
    from dipnet.pipeline.run import Manifest

    out = run_dir / "report" / "dip"
    roots = _model_dir_roots(run_dir, recipe)
    data_path = (Manifest(run_dir).entry("preprocess").get("outputs") or {}).get("path")
    if isinstance(data_path, str) and run_dir.resolve() not in Path(data_path).resolve().parents:
        raise UsageError(f"{run_dir / 'manifest.json'}: preprocess path {data_path} is outside the run directory")
    states: dict = defaultdict(dict)
    per_model: dict = defaultdict(dict)
    shared_batches = None
    for name, m in eval_entries(run_dir).items():
        md = _checked_model_dir(run_dir, name, m, roots)
        cfg = read_dip_config(md)
        if cfg is None or cfg.method not in NOISE_METHODS or not isinstance(data_path, str):
            continue
        state = read_dip_state(md)
        states[m["variant"]][m["seed"]] = state
        p = out / f"{name}.json"
        fp = model_fingerprint(md)
        cached = _load_json_or_none(p)
        if isinstance(cached, dict) and cached.get("fingerprint") == fp and _finite(cached.get("noise_cost")):
            per_model[m["variant"]][m["seed"]] = cached
            continue
        trust = bool(recipe.model.trust_remote_code) if recipe is not None else False
        model = load_causal_lm(md, trust_remote_code=trust, dtype=torch.float32)
        if shared_batches is None:
            micro = recipe.train.micro_batch_size if recipe is not None else 8
            shared_batches = training_batches(data_path, load_tokenizer(md, trust).pad_token_id or 0, batches, micro)
        res = noise_cost_and_curvature(model, shared_batches)
        del model
        rho = {k: spearman(state[k].exp(), h) for k, h in res["curvature"].items() if k in state}
        row = {"noise_cost": res["noise_cost"], "nll_mean": res["nll_mean"], "curvature_rho": rho,
               "method": cfg.method, "fingerprint": fp}
        out.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(row, indent=2))
        os.replace(tmp, p)
        per_model[m["variant"]][m["seed"]] = row
    summary = {}
    for variant, rows in per_model.items():
        lam = [float(v.exp().mean()) for st in states[variant].values() for v in st.values()]
        method = next(iter(rows.values()))["method"]
        cross = cross_seed_correlation(states[variant]) if method == "dip" and len(states[variant]) > 1 else {}
        finite = [r for r in cross.values() if r == r]
        rhos = [x for r in rows.values() for x in r["curvature_rho"].values() if x == x]
        summary[variant] = {
            "method": method, "seeds": len(rows), "noise_cost": mean(r["noise_cost"] for r in rows.values()),
            "noise_cost_std": std(r["noise_cost"] for r in rows.values()), "lambda_mean": mean(lam) if lam else None,
            "cross_seed_r": mean(finite) if finite else None,
            "cross_seed_r_per_projection": {k: (r if r == r else None) for k, r in cross.items()},
            "curvature_rho": mean(rhos) if method == "dip" and rhos else None}
    return {"variants": summary, "states": states}


def plot_lambda_histograms(run_dir: Path, states: dict) -> list[Path]:
    """ln λ across features, one panel per learned-λ variant (its first seed), one line per projection."""
    plt = _plt()
    paths = []
    for variant, per_seed in states.items():
        seed = min(per_seed)
        st = per_seed[seed]
        if all(float(v.max()) == float(v.min()) for v in st.values()):
            continue  # uniform λ (dip_fixed, dip_matched): nothing to show
        names = sorted(st, key=lambda k: (int(k.split(".")[0]) if k.split(".")[0].isdigit() else 0, k))
        if len(names) > 8:
            names = names[:3] + names[len(names) // 2:len(names) // 2 + 1] + names[-3:]
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for k in names:
            ax.hist((st[k] / 2.302585).tolist(), bins=40, histtype="step", label=k)
        ax.set_xlabel("log10 λ"), ax.set_ylabel("features"), ax.legend(fontsize=6)
        ax.set_title(f"λ per feature: {variant} (seed {seed})")
        paths.append(_save(fig, run_dir / "report" / f"lambda_hist_{variant}.png"))
    return paths


def headline_table(report_path: str | Path) -> str:
    """The accuracy table of report.md, for printing at the end of `make demo`."""
    text = Path(report_path).read_text()
    start = text.find("## Accuracy")
    end = text.find("## Paired")
    table = text[start:end].strip() if start != -1 else text[:2000]
    # What the seeds can detect comes first: no difference in the table is read without it.
    detect = next((line[2:] for line in text.splitlines() if line.startswith("- What ") and "can detect" in line), None)
    return f"{detect}\n\n{table}" if detect else table
