"""Evaluate one model directory on a list of tasks; write results.json and samples_<task>.jsonl.

    dipnet eval MODEL_DIR --tasks gsm8k,arith-ood --engine vllm --out DIR
    dipnet eval --predictions samples_gsm8k.jsonl --task gsm8k --out DIR    (re-score, no model)

Per task: both GSM8K scores (accuracy, n, 95% Wilson CI), teacher-forced answer NLL and token
accuracy (a forward pass, always with transformers), wall time and generated tokens/s, the
exact prompt set-up, engine and version, and a fingerprint of the model directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from dipnet.eval import extract
from dipnet.eval.metrics import wilson_interval
from dipnet.eval.tasks import Task, build_task, dump_jsonl, read_predictions, target_of
from dipnet.pipeline.errors import UsageError


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 of config, dip files and each weight file's size + first and last MiB."""
    d = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(d.glob("*.json")) + sorted((d / "dip").glob("*")) + sorted(d.glob("*.safetensors"))
    for p in (f for f in files if not f.name.startswith(".")):  # not our write marker: it changes every write
        h.update(p.name.encode())
        size = p.stat().st_size
        h.update(str(size).encode())
        with p.open("rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def max_model_len(model) -> int:
    c = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(c, attr, None):
            return min(int(getattr(c, attr)), 4096)
    return 2048


def score_rows(task: Task, outputs: list[str], prompts_text: list[str]) -> tuple[dict, list[dict]]:
    samples, correct = [], {s: 0 for s in extract.SCORES}
    for prob, out, ptxt in zip(task.problems, outputs, prompts_text):
        target = target_of(prob)
        sc = extract.score_output(out, target)
        for s in extract.SCORES:
            correct[s] += sc[s]["correct"]
        samples.append({"prompt": ptxt, "output": out, "target": target,
                        "extracted": {s: sc[s]["extracted"] for s in extract.SCORES},
                        "correct": {s: sc[s]["correct"] for s in extract.SCORES}})
    n = len(samples)
    scores = {s: {"accuracy": correct[s] / n if n else 0.0, "correct": correct[s], "n": n,
                  "ci95": list(wilson_interval(correct[s], n))} for s in extract.SCORES}
    return scores, samples


def evaluate_model(model_dir: str | Path, task_names: list[str], out_dir: str | Path, *, engine: str = "vllm",
                   shots: int = 0, limit: int | None = None, max_new_tokens: int = 64, chat_template: bool = False,
                   gsm8k_path: str | None = None, synthetic_settings=None, dip_mode: str = "mean",
                   noise_sigmas: list[float] | None = None, vllm_engine=None, progress: bool = True,
                   label: str | None = None, trust_remote_code: bool = False) -> dict:
    """Evaluate `model_dir` into `out_dir` (results.json + samples_<task>.jsonl); returns the results.

    The caller decides where `out_dir` is (the CLI and the eval stage build it under a
    temporary name and swap it in when complete, so results and samples always agree).
    """
    from dipnet.eval import hf_runner

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if engine not in ("vllm", "hf"):
        raise UsageError(f"unknown engine '{engine}'; expected vllm or hf")
    if dip_mode != "mean" and engine != "hf":
        raise UsageError(f"eval.dip_mode {dip_mode} needs engine hf (vLLM serves the mean path)")
    if limit is not None and limit <= 0:
        raise UsageError(f"eval limit must be > 0, got {limit}")
    if max_new_tokens <= 0 or shots < 0:
        raise UsageError(f"eval needs max_new_tokens > 0 and shots >= 0 (got {max_new_tokens}, {shots})")
    tasks = [build_task(t, shots=shots, limit=limit, synthetic_settings=synthetic_settings, gsm8k_path=gsm8k_path,
                        chat_template=chat_template) for t in task_names]
    k = int(dip_mode.split(":")[1]) if dip_mode.startswith("average:") else 1
    model, tok = hf_runner.load_hf(model_dir, dip_mode="sample" if k > 1 else "mean",
                                   trust_remote_code=trust_remote_code)
    L = max_model_len(model)
    for task in tasks:  # every prompt must fit: a silently cut few-shot prompt is another task
        longest = max(len(tok(task.prompt(p["question"], tok), add_special_tokens=not task.chat_template).input_ids)
                      for p in task.problems)
        if longest + max_new_tokens > L:
            raise UsageError(f"task {task.name}: the longest prompt has {longest} tokens; with max_new_tokens "
                             f"{max_new_tokens} it exceeds the model's context of {L} tokens (use fewer shots or "
                             "fewer new tokens)")
    own_engine = None
    if engine == "vllm" and vllm_engine is None:
        from dipnet.eval.vllm_runner import VllmEngine

        own_engine = vllm_engine = VllmEngine(model_dir, out / "vllm", L)
    if engine == "vllm":
        from dipnet.eval.vllm_runner import version

        engine_version = version()
    else:
        import transformers

        engine_version = f"transformers {transformers.__version__}"

    results = {"model_dir": str(model_dir), "model_fingerprint": model_fingerprint(model_dir), "engine": engine,
               "engine_version": engine_version, "dip_mode": dip_mode, "max_new_tokens": max_new_tokens,
               "max_model_len": L, "tasks": {}}
    try:
        for task in tasks:
            prompts_text = [task.prompt(p["question"], tok) for p in task.problems]
            enc = [tok(t, add_special_tokens=not task.chat_template).input_ids for t in prompts_text]
            fitted = [hf_runner.fit_prompt(ids, L, max_new_tokens) for ids in enc]
            prompts = [f[0] for f in fitted]
            t0 = time.time()
            if engine == "vllm":
                gens = vllm_engine.generate(prompts, max_new_tokens, task.stops)
            else:
                gens = hf_runner.greedy_generate(model, tok, prompts, max_new_tokens, task.stops, k=k)
            wall = time.time() - t0
            n_gen = sum(len(g[1]) for g in gens)
            scores, samples = score_rows(task, [g[0] for g in gens], prompts_text)
            tf = hf_runner.teacher_forced(model, tok, prompts, [p["answer"] for p in task.problems], L)
            for s, t in zip(samples, tf):
                s["answer_nll"], s["answer_token_acc"] = t["nll"], t["token_acc"]
            dump_jsonl(samples, out / f"samples_{task.name}.jsonl")
            results["tasks"][task.name] = {
                "n": len(task.problems), "setup": task.setup(), "scores": scores,
                "teacher_forced": {"answer_nll": sum(t["nll"] for t in tf) / len(tf),
                                   "answer_token_acc": sum(t["token_acc"] for t in tf) / len(tf)},
                "wall_s": wall, "generated_tokens": n_gen, "generated_tokens_per_s": n_gen / wall if wall > 0 else None,
                "truncated_prompts": sum(f[1] for f in fitted),
            }
            if progress:
                fx = scores["flexible-extract"]["accuracy"]
                print(f"  {label or Path(model_dir).name}: {task.name:16s} strict {scores['strict-match']['accuracy']:.3f} "
                      f"flexible {fx:.3f} nll {results['tasks'][task.name]['teacher_forced']['answer_nll']:.3f} "
                      f"({len(task.problems)} problems, {wall:.1f}s)", flush=True)
        if noise_sigmas:  # on the first task (its first 100 problems): hf generation per σ is the cost
            first = Task(name=tasks[0].name, problems=tasks[0].problems[:100], shots=tasks[0].shots,
                         stops=tasks[0].stops, chat_template=tasks[0].chat_template)
            results["noise_sweep"] = noise_sweep(model, tok, [first], noise_sigmas, max_new_tokens, L)
    finally:
        if own_engine is not None:
            own_engine.close()
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    return results


def noise_sweep(model, tok, tasks: list[Task], sigmas: list[float], max_new_tokens: int, L: int) -> dict:
    """Flexible-extract accuracy with Gaussian noise of σ (× token RMS) on the input embeddings
    (the paper's "Gaussian" condition), with the hf engine and DIP in mean mode."""
    from dipnet.eval import hf_runner
    from dipnet.pipeline import dip as dipmod

    dipmod.set_dip_mode(model, "mean")
    sweep = {}
    for task in tasks:
        prompts = [hf_runner.fit_prompt(tok(task.prompt(p["question"], tok)).input_ids, L, max_new_tokens)[0]
                   for p in task.problems]
        row = {}
        for sigma in sigmas:
            with hf_runner.embedding_noise(model, sigma, seed=0):
                gens = hf_runner.greedy_generate(model, tok, prompts, max_new_tokens, task.stops)
            scores, _ = score_rows(task, [g[0] for g in gens], [""] * len(prompts))
            row[str(sigma)] = scores["flexible-extract"]["accuracy"]
        sweep[task.name] = row
    return sweep


def rescore_predictions(path: str | Path, task_name: str, out_dir: str | Path) -> dict:
    """Score existing outputs (`output`, `target`) without a model."""
    rows = read_predictions(path)
    task = Task(name=task_name, problems=[{"question": r.get("prompt", ""), "answer": str(r["target"])} for r in rows])
    scores, samples = score_rows(task, [r["output"] for r in rows], [r.get("prompt", "") for r in rows])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_jsonl(samples, out / f"samples_{task_name}.jsonl")
    results = {"predictions": str(path), "engine": "none (re-scored)", "tasks": {task_name: {"n": len(rows), "scores": scores}}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
