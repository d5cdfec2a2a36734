"""bf16 mixed-precision training against fp32 on this CPU: loss curves, final eval, speed.

Runs the embedded study (recipes/tiny-arith.yaml: the 1M tiny base, 250 steps, 2 ranks, ZeRO-2) with
four variants, sft and dip each trained in fp32 and in bf16 (DeepSpeed bf16: bf16 weights and
activations, fp32 master weights and optimizer; DIP's λ kept as an fp32-resolved offset, see
pipeline/dip.py), at the seeds given, every model evaluated the same way (eval.dtype auto: float32
on a CPU). Prints, paired by seed:
- the loss curves: mean |NLL_bf16 - NLL_fp32| over the logged steps, and the final NLL in each;
- arith-id / arith-ood accuracy per variant and the bf16 - fp32 difference per seed (with its range);
- training tokens/s, bf16 / fp32 (on the 1M model, dominated by per-step overheads; the matmul
  rates that decide larger models are printed by bench/limits.py --precision fp32,bf16).

    python bench/bf16_training.py [--seeds 0,1,2] [--steps 250]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--keep", help="keep the run directory here (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-arith.yaml").read_text())
    tmp = Path(tempfile.mkdtemp(prefix="dipnet-bf16-"))
    run_dir = Path(args.keep).resolve() if args.keep else tmp / "run"
    recipe["run"].update(name="bf16-check", output_dir=str(run_dir))
    recipe["train"].update(max_steps=args.steps, save_every=args.steps)
    recipe["eval"].update(tasks=["arith-id", "arith-ood"], noise_sigmas=[], eval_base=False)
    recipe["variants"] = {"sft": {"dip.method": "none"}, "dip": {},
                          "sft-bf16": {"dip.method": "none", "train.precision": "bf16"},
                          "dip-bf16": {"train.precision": "bf16"}}
    recipe["seeds"] = seeds
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    try:
        subprocess.run([sys.executable, "-m", "dipnet.pipeline.cli", "run", str(tmp / "recipe.yaml"), "--quiet"],
                       check=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        report(run_dir, seeds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rows(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train" / name / "metrics.jsonl").read_text().splitlines()]


def report(run_dir: Path, seeds: list[int]) -> None:
    def summary(name):
        return json.loads((run_dir / "train" / name / "train_summary.json").read_text())

    def acc(name, task):
        r = json.loads((run_dir / "eval" / name / "results.json").read_text())
        return r["tasks"][task]["scores"]["flexible-extract"]["accuracy"]

    print(f"\n{'run':14s} {'mean |ΔNLL| over steps':>23s} {'final NLL fp32':>15s} {'bf16':>7s} {'tokens/s bf16 ÷ fp32':>21s}")
    speed = []
    for v in ("sft", "dip"):
        for s in seeds:
            a, b = rows(run_dir, f"{v}-s{s}"), rows(run_dir, f"{v}-bf16-s{s}")
            assert [r["step"] for r in a] == [r["step"] for r in b]
            gap = statistics.mean(abs(x["nll"] - y["nll"]) for x, y in zip(a, b))
            ratio = (summary(f"{v}-bf16-s{s}")["step_time"]["tokens_per_s"]
                     / summary(f"{v}-s{s}")["step_time"]["tokens_per_s"])
            speed.append(ratio)
            print(f"{v}-s{s:<10d} {gap:23.4f} {a[-1]['nll']:15.4f} {b[-1]['nll']:7.4f} {ratio:21.2f}")
    print(f"\n{'variant':8s} {'task':9s} {'fp32':>7s} {'bf16':>7s} {'bf16 - fp32 per seed (points)':>32s}")
    for v in ("sft", "dip"):
        for t in ("arith-id", "arith-ood"):
            f = [acc(f"{v}-s{s}", t) for s in seeds]
            h = [acc(f"{v}-bf16-s{s}", t) for s in seeds]
            d = [100 * (y - x) for x, y in zip(f, h)]
            print(f"{v:8s} {t:9s} {statistics.mean(f):7.3f} {statistics.mean(h):7.3f} "
                  f"{' '.join(f'{x:+.1f}' for x in d):>24s} (mean {statistics.mean(d):+.1f})")
    print(f"\ntraining tokens/s, bf16 ÷ fp32: median {statistics.median(speed):.2f} (range {min(speed):.2f}-{max(speed):.2f})")


if __name__ == "__main__":
    main()
