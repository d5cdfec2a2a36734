"""Evaluate one model directory on a list of tasks; write results.json and samples_<task>.jsonl.

    dipnet eval MODEL_DIR --tasks gsm8k,arith-ood --engine vllm --out DIR
    dipnet eval --predictions samples_gsm8k.jsonl --task gsm8k --out DIR    (re-score, no model)

Per task: both GSM8K scores (accuracy, n, 95% Wilson CI), teacher-forced answer NLL and token
accuracy (on the same engine: vLLM prompt logprobs, or a transformers forward pass), wall time
and generated tokens/s, the exact prompt set-up (lm-eval 0.4.13's, see tasks.py), engine and
version, and a fingerprint of the model directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from dipnet.eval import extract
from dipnet.eval.metrics import wilson_interval
from dipnet.eval.sampling import Sampling, score_sampled
from dipnet.eval.tasks import (DEFAULT_MAX_NEW_TOKENS, FILTERS, Task, build_task, dump_jsonl, encode_prompt,
                               read_predictions, stops_with_eos, target_of)
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


def max_model_len(config: dict, bound: int | None = None) -> int:
    """The context the model was built for (its config), bounded by `bound` (eval.max_model_len)."""
    own = None
    for c in (config, config.get("text_config") or {}):
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if own is None and isinstance(c.get(attr), int) and c[attr] > 0:
                own = c[attr]
    own = own or 2048
    return min(own, bound) if bound else own


def score_rows(task: Task, outputs: list[str], prompts_text: list[str]) -> tuple[dict, list[dict]]:
    names = list(task.filters)
    samples, correct = [], {s: 0 for s in names}
    for prob, out, ptxt in zip(task.problems, outputs, prompts_text):
        target = target_of(prob)
        sc = extract.score_output(out, target, task.filters)
        for s in names:
            correct[s] += sc[s]["correct"]
        samples.append({"prompt": ptxt, "output": out, "target": target,
                        "extracted": {s: sc[s]["extracted"] for s in names},
                        "correct": {s: sc[s]["correct"] for s in names}})
    n = len(samples)
    scores = {s: {"accuracy": correct[s] / n if n else 0.0, "correct": correct[s], "n": n,
                  "ci95": list(wilson_interval(correct[s], n))} for s in names}
    return scores, samples


def spread(done: list, keep: list[int], n: int, empty) -> list:
    """The results of the problems that ran (`keep`, in order) back at their places among `n`;
    a problem that did not run gets `empty`."""
    full = [empty] * n
    for i, v in zip(keep, done):
        full[i] = v
    return full


def answer_ids(tok, answer: str) -> list[int]:
    """The reference answer's tokens as they follow a prompt (`Answer:` + target delimiter)."""
    return tok(" " + answer.strip(), add_special_tokens=False).input_ids


def tokens_in_flight(tasks, encoded: dict, tok, budgets: dict, max_len: int, answer_nll: bool, n: int = 1) -> int:
    """The most KV-cache tokens one of these tasks holds at once on the vLLM engine: its prompts
    (as many as run together) at their longest, plus the generation or the scored answer."""
    from dipnet.eval.vllm_runner import MAX_NUM_SEQS_CPU

    most = 1
    for task in tasks:
        ids = encoded[task.name][1]
        answer = max((len(answer_ids(tok, p["answer"])) for p in task.problems), default=0) if answer_nll else 0
        longest = min(max_len, max(map(len, ids)) + max(budgets[task.name], answer))
        most = max(most, min(len(ids) * n, MAX_NUM_SEQS_CPU) * longest)
    return most


def evaluate_model(model_dir: str | Path, task_names: list[str], out_dir: str | Path, *, engine: str = "vllm",
                   shots: int = 0, limit: int | None = None, max_new_tokens: int | None = None,
                   chat: str | None = None, gsm8k_path: str | None = None, synthetic_settings=None,
                   dip_mode: str = "mean", noise_sigmas: list[float] | None = None, vllm_engine=None,
                   progress: bool = True, label: str | None = None, trust_remote_code: bool = False,
                   harness_tasks: list[str] | None = None, answer_nll: bool = True,
                   dtype: str = "auto", context_bound: int | None = None, tensor_parallel_size: int | None = None,
                   gpu_memory_utilization: float = 0.9, sampling: Sampling | None = None) -> dict:
    """Evaluate `model_dir` into `out_dir` (results.json + samples_<task>.jsonl); returns the results.

    With engine vllm, generation and the teacher-forced answer NLL both run on the vLLM engine
    (`prompt_logprobs`); transformers loads the model only for engine hf, DIP sampling modes
    and the noise sweep. The caller decides where `out_dir` is (the CLI and the eval stage build
    it under a temporary name and swap it in when complete, so results and samples agree).
    """
    from dipnet.eval import hf_runner
    from dipnet.eval.vllm_runner import resolve_dtype
    from dipnet.pipeline.models import check_model_dir, load_tokenizer, read_adapter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if engine not in ("vllm", "hf"):
        raise UsageError(f"unknown engine '{engine}'; expected vllm or hf")
    if dip_mode != "mean" and engine != "hf":
        raise UsageError(f"eval.dip_mode {dip_mode} needs engine hf (vLLM serves the mean path)")
    sampling = (sampling or Sampling()).check()
    if not sampling.greedy and dip_mode != "mean":
        raise UsageError(f"eval.dip_mode {dip_mode} averages greedy trajectories; sampling (eval.samples, "
                         "eval.temperature) runs on the mean path")
    if limit is not None and limit <= 0:
        raise UsageError(f"eval limit must be > 0, got {limit}")
    if (max_new_tokens is not None and max_new_tokens <= 0) or shots < 0:
        raise UsageError(f"eval needs max_new_tokens > 0 and shots >= 0 (got {max_new_tokens}, {shots})")
    tasks = [build_task(t, shots=shots, limit=limit, synthetic_settings=synthetic_settings, gsm8k_path=gsm8k_path,
                        chat=chat) for t in task_names]
    harness_tm = None
    if harness_tasks:  # tasks and their data checked before any model or engine loads
        from dipnet.eval.harness import prepare_harness

        harness_tm = prepare_harness(harness_tasks, out / "harness", gsm8k_path=gsm8k_path,
                                     synthetic_settings=synthetic_settings)
    adapter = read_adapter(model_dir, trust_remote_code)  # a PEFT adapter: its base holds the weights
    weights = adapter.base if adapter else model_dir
    if adapter and (harness_tasks or noise_sigmas):
        raise UsageError(f"{model_dir}: lm-eval tasks and the noise sweep need a merged model (export.merge_lora: true)")
    cfg = check_model_dir(weights, trust_remote_code)
    L = max_model_len(cfg, context_bound)
    tok = load_tokenizer(model_dir, trust_remote_code)
    k = int(dip_mode.split(":")[1]) if dip_mode.startswith("average:") else 1
    model = None
    hf_dtype = resolve_dtype(dtype, "hf", model_dir)  # export.json (the trained precision) is in either
    # vLLM's prompt logprobs with a LoRA adapter fail on a shape mismatch (vllm#29955) or drop an
    # lm_head delta (vllm#51594): an adapter's answer NLL comes from transformers instead.
    nll_engine = "hf" if adapter and engine == "vllm" else engine
    if engine == "hf" or noise_sigmas or (answer_nll and nll_engine == "hf"):
        model, _ = hf_runner.load_hf(model_dir, dip_mode="sample" if k > 1 else "mean",
                                     trust_remote_code=trust_remote_code, dtype=hf_dtype)
    encoded, budgets, fits = {}, {}, {}
    for task in tasks:  # a prompt is never cut: a silently cut few-shot prompt is another task
        texts = [task.prompt(i, tok) for i in range(len(task.problems))]
        ids = [encode_prompt(tok, t) for t in texts]
        # A prompt that fills the context on its own is not run: it is scored wrong and named in
        # its sample row and results (`over_long`), so every model is scored on the same problems.
        fits[task.name] = keep = [i for i, x in enumerate(ids) if len(x) < L]
        over = len(ids) - len(keep)
        if not keep:
            raise UsageError(f"task {task.name}: every prompt has {L} tokens or more, the model's whole context "
                             "(use fewer shots or a model with a longer context)")
        if over:
            print(f"  note: task {task.name}: {over} of {len(ids)} prompts have {L} tokens or more (the model's "
                  "context); they are scored wrong, not cut (over_long in results.json)", file=sys.stderr)
        longest = max(len(ids[i]) for i in keep)
        budgets[task.name] = budget = max_new_tokens or task.max_new_tokens
        if longest + budget > L:
            if max_new_tokens is not None:
                raise UsageError(f"task {task.name}: the longest prompt has {longest} tokens; with max_new_tokens "
                                 f"{budget} it exceeds the model's context of {L} tokens (use fewer shots or "
                                 "fewer new tokens)")
            # The task's own default, not the user's: what the context leaves, said once.
            budgets[task.name] = L - longest
            print(f"  note: task {task.name}: max_new_tokens {budget} capped at {L - longest} by the model's context "
                  f"of {L} tokens (longest prompt {longest})", file=sys.stderr)
        encoded[task.name] = (texts, ids)
    own_engine = None
    if engine == "vllm" and vllm_engine is None:
        from dipnet.eval.vllm_runner import VllmEngine

        # Harness tasks bring lm-eval's prompts: then the KV cache is sized for vLLM's whole batch.
        in_flight = None if harness_tasks else tokens_in_flight(tasks, encoded, tok, budgets, L, answer_nll, sampling.n)
        own_engine = vllm_engine = VllmEngine(weights, out / "vllm", L, dtype=dtype, kv_tokens=in_flight,
                                              tensor_parallel_size=tensor_parallel_size,
                                              gpu_memory_utilization=gpu_memory_utilization, adapter=adapter)
    if engine == "vllm":
        from dipnet.eval.vllm_runner import version

        engine_version = version()
    else:
        import transformers

        engine_version = f"transformers {transformers.__version__}"

    results = {"model_dir": str(model_dir), "model_fingerprint": model_fingerprint(model_dir), "engine": engine,
               "engine_version": engine_version, "dip_mode": dip_mode, "max_new_tokens": max_new_tokens,
               "sampling": None if sampling.greedy else sampling.record(),
               "max_model_len": L, "dtype": vllm_engine.dtype if engine == "vllm" else hf_dtype,
               "tasks": {}}
    try:
        for task in tasks:
            prompts_text, prompts = encoded[task.name]
            stops = stops_with_eos(task, tok)
            t0 = time.time()
            sampled = None
            keep = fits[task.name]
            over_long = sorted(set(range(len(prompts))) - set(keep))
            run = [prompts[i] for i in keep]
            if not sampling.greedy:
                if engine == "vllm":
                    groups = vllm_engine.sample(run, budgets[task.name], stops, sampling)
                else:
                    groups = hf_runner.sample_generate(model, tok, run, budgets[task.name], stops, sampling)
                groups = spread(groups, keep, len(prompts), [("", [])] * sampling.n)
                wall = time.time() - t0
                n_gen = sum(len(g[1]) for grp in groups for g in grp)
                scores, samples, sampled = score_sampled(task, [[g[0] for g in grp] for grp in groups],
                                                         [[g[1] for g in grp] for grp in groups], prompts_text,
                                                         [target_of(p) for p in task.problems], sampling)
            else:
                if engine == "vllm":
                    gens = vllm_engine.generate(run, budgets[task.name], stops)
                else:
                    gens = hf_runner.greedy_generate(model, tok, run, budgets[task.name], stops, k=k)
                gens = spread(gens, keep, len(prompts), ("", []))
                wall = time.time() - t0
                n_gen = sum(len(g[1]) for g in gens)
                scores, samples = score_rows(task, [g[0] for g in gens], prompts_text)
            teacher_forced = None
            if answer_nll:  # one more prefill of every prompt + answer (lm-eval computes no such thing)
                answers = [answer_ids(tok, task.problems[i]["answer"]) for i in keep]
                t1 = time.time()
                if nll_engine == "vllm":
                    tf = vllm_engine.score(run, answers)
                elif k == 1:
                    tf = hf_runner.teacher_forced(model, tok, run, answers, L)
                else:  # average:k: the NLL of each of k noisy passes, averaged (not one pass's)
                    import torch

                    passes = []
                    for j in range(k):
                        torch.manual_seed(j)
                        passes.append(hf_runner.teacher_forced(model, tok, run, answers, L))
                    tf = [{"nll": sum(p[i]["nll"] for p in passes) / k,
                           "token_acc": sum(p[i]["token_acc"] for p in passes) / k} for i in range(len(run))]
                for i, t in zip(keep, tf):
                    samples[i]["answer_nll"], samples[i]["answer_token_acc"] = t["nll"], t["token_acc"]
                teacher_forced = {"answer_nll": sum(t["nll"] for t in tf) / len(tf),
                                  "answer_token_acc": sum(t["token_acc"] for t in tf) / len(tf),
                                  "n": len(tf), "engine": nll_engine, "wall_s": time.time() - t1}
            for i in over_long:
                samples[i]["over_long"] = {"prompt_tokens": len(prompts[i]), "context": L}
            dump_jsonl(samples, out / f"samples_{task.name}.jsonl")
            results["tasks"][task.name] = {
                "n": len(task.problems), "setup": task.setup(), "max_new_tokens": budgets[task.name],
                "scores": scores, "teacher_forced": teacher_forced, **({"sampled": sampled} if sampled else {}),
                "over_long": over_long,
                "wall_s": wall, "generated_tokens": n_gen, "generated_tokens_per_s": n_gen / wall if wall > 0 else None,
            }
            if progress:
                acc = "  ".join(f"{s} {v['accuracy']:.3f}" for s, v in scores.items())
                nll = f"nll {teacher_forced['answer_nll']:.3f} " if teacher_forced else ""
                print(f"  {label or Path(model_dir).name}: {task.name:16s} {acc} {nll}"
                      f"({len(task.problems)} problems, {wall:.1f}s)", flush=True)
        if noise_sigmas:  # on the first task (its first 100 problems): hf generation per σ is the cost
            texts, ids = encoded[tasks[0].name]
            fit = fits[tasks[0].name][:100]
            sub = Task(name=tasks[0].name, problems=[tasks[0].problems[i] for i in fit], filters=tasks[0].filters)
            results["noise_sweep"] = noise_sweep(model, tok, sub, [ids[i] for i in fit], noise_sigmas,
                                                 budgets[tasks[0].name])
        if harness_tasks:  # lm-eval's tasks, on the same engine (its files under out/harness)
            from dipnet.eval.harness import run_harness

            t0 = time.time()
            results["harness"] = run_harness(model_dir, harness_tasks, out / "harness", harness_tm, engine=engine,
                                             vllm_engine=vllm_engine, limit=limit, max_length=L,
                                             max_gen_toks=max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
                                             sampling_seed=sampling.seed,
                                             trust_remote_code=trust_remote_code)
            if progress:
                for t, m in results["harness"].items():
                    print(f"  {label or Path(model_dir).name}: {t:16s} (lm-eval) " +
                          "  ".join(f"{k} {v:.3f}" for k, v in m.items()) + f" ({time.time() - t0:.1f}s)", flush=True)
    finally:
        if own_engine is not None:
            own_engine.close()
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    return results


def noise_sweep(model, tok, task: Task, prompts: list[list[int]], sigmas: list[float], max_new_tokens: int) -> dict:
    """Flexible-extract accuracy with Gaussian noise of σ (× token RMS) on the input embeddings
    (the paper's "Gaussian" condition), with the hf engine and DIP in mean mode."""
    from dipnet.eval import hf_runner
    from dipnet.pipeline import dip as dipmod

    dipmod.set_dip_mode(model, "mean")
    first = Task(name=task.name, problems=task.problems[:len(prompts)], filters=task.filters)
    row = {}
    for sigma in sigmas:
        with hf_runner.embedding_noise(model, sigma, seed=0):
            gens = hf_runner.greedy_generate(model, tok, prompts, max_new_tokens, stops_with_eos(task, tok))
        scores, _ = score_rows(first, [g[0] for g in gens], [""] * len(prompts))
        row[str(sigma)] = scores["flexible-extract"]["accuracy"]
    return {task.name: row}


def rescore_predictions(path: str | Path, task_name: str, out_dir: str | Path) -> dict:
    """Score existing outputs (`output`, `target`) without a model."""
    rows = read_predictions(path)
    task = Task(name=task_name, problems=[{"question": r.get("prompt", ""), "answer": str(r["target"])} for r in rows],
                filters=dict(FILTERS.get(task_name, FILTERS["gsm8k"])))
    scores, samples = score_rows(task, [r["output"] for r in rows], [r.get("prompt", "") for r in rows])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dump_jsonl(samples, out / f"samples_{task_name}.jsonl")
    results = {"predictions": str(path), "engine": "none (re-scored)", "tasks": {task_name: {"n": len(rows), "scores": scores}}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results
