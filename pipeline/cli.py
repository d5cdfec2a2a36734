"""`dipnet`: the command line. Each subcommand parses its arguments and calls one function.

    dipnet validate RECIPE [KEY=VALUE ...]     check a recipe, run nothing
    dipnet run RECIPE [KEY=VALUE ...] [--from STAGE | --only STAGE]
    dipnet base tiny --out DIR                 build the embedded tiny base
    dipnet convert MODEL_DIR --out DIR [--method dip --init-variance 1e-2 ...]
    dipnet export CHECKPOINT --out DIR
    dipnet eval MODEL_DIR --tasks arith-id,gsm8k --engine vllm --out DIR
    dipnet eval --predictions FILE --task gsm8k --out DIR
    dipnet serve MODEL_DIR [--host 127.0.0.1 --port 8000]
    dipnet report RUN_DIR
    dipnet smoothness MODEL_DIR [--task arith-id]
    dipnet launch RECIPE --slurm [--nodes N --gpus-per-node G ...] [--dry-run]
    dipnet status RUN_DIR [--wait]  |  dipnet cancel RUN_DIR

Errors print one line (`error: ...`) and exit 2 for bad input, 1 for run-time failures; add
`--debug` for the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import sys
from pathlib import Path

from dipnet.pipeline.env import note_usr1_in_job, omp_wait_for_shared_cores
from dipnet.pipeline.errors import DipnetError, UsageError

COMMANDS = ("validate", "run", "base", "convert", "export", "eval", "serve", "report", "smoothness", "launch",
            "status", "cancel", "env")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage."""

    def error(self, message):
        if "invalid choice" in message and "command" in message:
            bad = message.split("'")[1] if "'" in message else message
            close = difflib.get_close_matches(bad, COMMANDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; commands: {', '.join(COMMANDS)}"
            raise UsageError(f"unknown command '{bad}'{hint}")
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dipnet", description="DIP fine-tuning pipeline: convert, train with DeepSpeed, export, evaluate with vLLM.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("validate", help="validate a recipe without running it")
    s.add_argument("recipe"), s.add_argument("overrides", nargs="*", help="KEY=VALUE")

    s = sub.add_parser("run", help="run a recipe's stages")
    s.add_argument("recipe"), s.add_argument("overrides", nargs="*", help="KEY=VALUE")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--from", dest="from_stage", help="re-run from this stage on")
    g.add_argument("--only", help="run only this stage")
    s.add_argument("--quiet", action="store_true")

    s = sub.add_parser("base", help="build the embedded tiny base, or import a GGUF pretrained model")
    bsub = s.add_subparsers(dest="base_kind", metavar="tiny|import", parser_class=_Parser)
    bsub.required = True
    b = bsub.add_parser("tiny", help="build the embedded tiny base")
    b.add_argument("--out", required=True), b.add_argument("--seed", type=int, default=0)
    b.add_argument("overrides", nargs="*", help="model.tiny.KEY=VALUE")
    b = bsub.add_parser("import", help="a GGUF file (or a named source) -> a Hugging Face model directory")
    b.add_argument("source", help="FILE.gguf, or a named source: " + ", ".join(sorted(_sources())))
    b.add_argument("--out", required=True)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])

    s = sub.add_parser("convert", help="attach DIP projections to a Hugging Face causal LM")
    s.add_argument("model_dir"), s.add_argument("--out", required=True)
    s.add_argument("--method", default="dip"), s.add_argument("--placement", default="block_input")
    s.add_argument("--scale", default="relative"), s.add_argument("--init-variance", type=float, default=1e-2)
    s.add_argument("--layers", default=None, help="comma-separated block indices")
    s.add_argument("--noise-scale", type=float, default=None, help="input_noise σ (0.1) or NEFTune α (5)")
    s.add_argument("--trust-remote-code", action="store_true")

    s = sub.add_parser("export", help="consolidate a DeepSpeed checkpoint into a Hugging Face directory")
    s.add_argument("checkpoint"), s.add_argument("--out", required=True)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    s.add_argument("--base", default=None, help="the converted model the run trained from (default: the one the "
                                                 "checkpoint names)")
    s.add_argument("--trust-remote-code", action="store_true",
                   help="allow code shipped with that model (never taken from the checkpoint)")
    s.add_argument("--no-merge-lora", action="store_true",
                   help="a LoRA run as a PEFT adapter directory for its base (export.merge_lora: false)")
    s.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="then upload the export to the Hub as the private model repo REPO (namespace/name; the token "
                        "from HF_TOKEN or `hf auth login`, never from dipnet's files)")

    s = sub.add_parser("eval", help="evaluate a model directory, or re-score predictions")
    s.add_argument("model_dir", nargs="?")
    s.add_argument("--tasks", default=None, help="dipnet tasks (default arith-id,arith-ood; none with --harness-tasks)"), s.add_argument("--engine", default="vllm")
    s.add_argument("--out", required=True), s.add_argument("--shots", type=int, default=0)
    s.add_argument("--limit", type=int, default=None), s.add_argument("--max-new-tokens", type=int, default=None)
    s.add_argument("--samples", type=int, default=1, help="completions per problem (needs --temperature > 0)")
    s.add_argument("--temperature", type=float, default=0.0), s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0), s.add_argument("--sampling-seed", type=int, default=0)
    s.add_argument("--k", default="", help="comma-separated k of maj@k and pass@k (default 1 and --samples)")
    s.add_argument("--chat", default="none", help="none | single (lm-eval --apply_chat_template) | multiturn "
                   "(with --fewshot_as_multiturn)")
    s.add_argument("--gsm8k-path", default=None)
    s.add_argument("--harness-tasks", default="", help="lm-evaluation-harness tasks, comma-separated")
    s.add_argument("--no-answer-nll", action="store_true", help="skip the teacher-forced answer NLL (one prefill less)")
    s.add_argument("--dip-mode", default="mean"), s.add_argument("--noise-sigmas", default="")
    s.add_argument("--dtype", default="auto", help="auto (vLLM bfloat16 on a GPU, float32 on CPU), float32 or bfloat16")
    s.add_argument("--predictions", help="JSONL with 'output' and 'target' to re-score (no model)")
    s.add_argument("--task", help="task of --predictions")

    s = sub.add_parser("serve", help="serve a model with vLLM's OpenAI-compatible server")
    s.add_argument("model_dir"), s.add_argument("--host", default="127.0.0.1"), s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workdir", default=None, help="where vLLM's caches and sockets go (default: a temp dir)")

    s = sub.add_parser("report", help="regenerate a run's report from stored results")
    s.add_argument("run_dir"), s.add_argument("--no-smoothness", action="store_true")

    s = sub.add_parser("smoothness", help="input-smoothness measures of a model")
    s.add_argument("model_dir"), s.add_argument("--task", default="arith-id", help="held-out task (or --data)")
    s.add_argument("--data", default=None, help="JSONL with question/answer rows")
    s.add_argument("--limit", type=int, default=64), s.add_argument("--epsilon", type=float, default=0.05)
    s.add_argument("--out", default=None)

    s = sub.add_parser("launch", help="submit a recipe to Slurm (or print the job script)")
    s.add_argument("recipe"), s.add_argument("overrides", nargs="*", help="KEY=VALUE")
    s.add_argument("--slurm", action="store_true", required=True)
    s.add_argument("--nodes", type=int), s.add_argument("--gpus-per-node", type=int)
    s.add_argument("--cpus-per-task", type=int), s.add_argument("--partition"), s.add_argument("--time")
    s.add_argument("--account"), s.add_argument("--launcher", choices=["torchrun", "deepspeed"])
    s.add_argument("--hostfile"), s.add_argument("--dry-run", action="store_true")
    s.add_argument("--until", choices=["preprocess", "train", "export", "eval"], help="submit the chain up to this job")

    s = sub.add_parser("status", help="state of a run's stages (and Slurm jobs)")
    s.add_argument("run_dir"), s.add_argument("--wait", action="store_true")
    s.add_argument("--timeout", type=float, default=3600)

    s = sub.add_parser("cancel", help="cancel a run's Slurm job chain")
    s.add_argument("run_dir")

    s = sub.add_parser("env", help="the stack on this machine (versions, GPUs, DeepSpeed ops, Slurm, caches)")
    s.add_argument("--json", action="store_true"), s.add_argument("--no-ops", action="store_true",
                                                                   help="skip DeepSpeed's op check (faster)")
    return p


# ----------------------------------------------------------------------------- commands

def cmd_validate(a) -> int:
    from dipnet.pipeline.recipe import expand_runs, load_recipe

    from dipnet.pipeline.trackers import check_trackers

    r = load_recipe(a.recipe, a.overrides)
    runs = expand_runs(r)
    for report_to in {tuple(x.train.report_to) for _, _, x in runs}:
        check_trackers(list(report_to), f"{a.recipe}: 'train.report_to'")
    print(f"{a.recipe}: ok ({len(runs)} training run(s): {', '.join(sorted({v for v, _, _ in runs}))}; "
          f"run directory {r.output_dir})")
    return 0


def cmd_run(a) -> int:
    from dipnet.pipeline.recipe import load_recipe
    from dipnet.pipeline.run import run_pipeline

    r = load_recipe(a.recipe, a.overrides)
    run_dir = run_pipeline(r, from_stage=a.from_stage, only=a.only, progress=not a.quiet, recipe_path=a.recipe)
    report = run_dir / "report.md"
    if report.is_file():
        from dipnet.pipeline.report import headline_table

        print("\n" + headline_table(report) + "\n")
        print(f"report: {report}")
    print(f"run directory: {run_dir}")
    return 0


def _sources():
    from dipnet.pipeline.pretrained import SOURCES

    return SOURCES


def cmd_base(a) -> int:
    import shutil

    from dipnet.pipeline.base_model import tiny_base
    from dipnet.pipeline.outputs import MARKER, check_output_target, output_dir
    from dipnet.pipeline.recipe import TinyBaseSettings, apply_overrides

    if a.base_kind == "import":
        from dipnet.pipeline.pretrained import SOURCES, fetch_source, import_gguf

        gguf = fetch_source(a.source) if a.source in SOURCES else a.source
        info = import_gguf(gguf, a.out, dtype=a.dtype)
        print(json.dumps(info, indent=2))
        print(f"imported: {a.out}")
        return 0
    raw = apply_overrides({}, [o[len("model.tiny."):] if o.startswith("model.tiny.") else o for o in a.overrides])
    settings = _settings(TinyBaseSettings, raw, {k: f"model.tiny.{k}" for k in TinyBaseSettings.model_fields})
    check_output_target(a.out)  # refused before a build that may take minutes
    # Built once per content hash into the cache (as `dipnet run` does), then copied: a second
    # `base tiny --out` is a copy, not another pretraining. A copy, not hard links: the user
    # owns DIR and may edit its files without touching the cache.
    cached = tiny_base(settings, seed=a.seed)
    with output_dir(a.out, "model", inputs=[cached]) as tmp:
        shutil.copytree(cached, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MARKER))
    out = Path(a.out)
    print(json.dumps(json.loads((out / "pretrain.json").read_text()), indent=2))
    print(f"tiny base: {out} (copied from the cache: {cached})")
    return 0


def _settings(cls, values: dict, flags: dict[str, str]):
    """Validate CLI values with the recipe's own settings class; errors name the flag."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(values)
    except ValidationError as exc:
        from dipnet.pipeline.recipe import _describe_expected

        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        got = err.get("input")
        shown = "" if isinstance(got, (dict, list)) or err["type"].startswith("value_error") else f", got {got!r}"
        raise UsageError(f"{flags.get(key, key or 'arguments')}: {_describe_expected(err)}{shown}") from None


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def _float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def cmd_convert(a) -> int:
    from dipnet.pipeline.convert import convert
    from dipnet.pipeline.dip import DipConfig
    from dipnet.pipeline.recipe import DipSettings

    layers = _int_list(a.layers, "--layers") if a.layers else None
    d = _settings(DipSettings, {"method": a.method, "placement": a.placement, "scale": a.scale,
                                "init_variance": a.init_variance, "layers": layers, "noise_scale": a.noise_scale},
                  {"method": "--method", "placement": "--placement", "scale": "--scale", "init_variance": "--init-variance",
                   "layers": "--layers", "noise_scale": "--noise-scale"})
    cfg = DipConfig.from_settings(d)
    print(json.dumps(convert(a.model_dir, a.out, cfg, trust_remote_code=a.trust_remote_code), indent=2))
    return 0


def cmd_export(a) -> int:
    from dipnet.pipeline.export import export_checkpoint

    from dipnet.pipeline.export import check_hub_repo, push_to_hub

    if a.push_to_hub is not None:
        check_hub_repo(a.push_to_hub)  # before the export: a typo costs nothing
    summary = export_checkpoint(a.checkpoint, a.out, dtype=a.dtype, base=a.base,
                                trust_remote_code=a.trust_remote_code, merge_lora=not a.no_merge_lora)
    print(json.dumps(summary, indent=2))
    if a.push_to_hub is not None:
        print(f"pushed to {push_to_hub(Path(a.out), a.push_to_hub)}")
    return 0


def _check_task(t: str) -> str:
    from dipnet.eval.tasks import TASKS

    if t not in TASKS:
        close = difflib.get_close_matches(t, TASKS, n=1)
        raise UsageError(f"unknown task '{t}'" + (f" (did you mean '{close[0]}'?)" if close else f"; tasks: {', '.join(TASKS)}"))
    return t


def cmd_eval(a) -> int:
    from dipnet.eval.evaluate import evaluate_model, rescore_predictions
    from dipnet.pipeline.outputs import output_dir
    from dipnet.pipeline.recipe import EvalSettings

    if a.predictions:
        if not a.task:
            raise UsageError("--predictions needs --task (e.g. --task gsm8k)")
        _check_task(a.task)
        with output_dir(a.out, "eval", inputs=[a.predictions]) as tmp:
            res = rescore_predictions(a.predictions, a.task, tmp)
    else:
        if not a.model_dir:
            raise UsageError("dipnet eval: give MODEL_DIR, or --predictions FILE --task TASK")
        names = a.tasks if a.tasks is not None else ("" if a.harness_tasks.strip() else "arith-id,arith-ood")
        tasks = [_check_task(t.strip()) for t in names.split(",") if t.strip()]
        if not tasks and not a.harness_tasks.strip():
            raise UsageError("--tasks: expected at least one task (or --harness-tasks)")
        e = _settings(EvalSettings, {"engine": a.engine, "tasks": tasks, "shots": a.shots, "limit": a.limit,
                                     "max_new_tokens": a.max_new_tokens, "dip_mode": a.dip_mode,
                                     "noise_sigmas": _float_list(a.noise_sigmas, "--noise-sigmas"),
                                     "gsm8k_path": a.gsm8k_path, "chat": a.chat, "dtype": a.dtype,
                                     "samples": a.samples, "temperature": a.temperature, "top_p": a.top_p,
                                     "top_k": a.top_k, "sampling_seed": a.sampling_seed,
                                     "k": [int(x) if x.strip().isdigit() else x for x in a.k.split(",") if x.strip()],
                                     "harness_tasks": [t.strip() for t in a.harness_tasks.split(",") if t.strip()]},
                      {"chat": "--chat", "harness_tasks": "--harness-tasks", "engine": "--engine", "shots": "--shots", "limit": "--limit", "max_new_tokens": "--max-new-tokens",
                       "dip_mode": "--dip-mode", "noise_sigmas": "--noise-sigmas", "gsm8k_path": "--gsm8k-path",
                       "dtype": "--dtype", "samples": "--samples", "temperature": "--temperature", "top_p": "--top-p",
                       "top_k": "--top-k", "sampling_seed": "--sampling-seed", "k": "--k"})
        if e.gsm8k_path and not Path(e.gsm8k_path).is_dir():
            raise UsageError(f"--gsm8k-path {e.gsm8k_path}: no such directory")
        with output_dir(a.out, "eval", inputs=[a.model_dir]) as tmp:
            res = evaluate_model(a.model_dir, list(e.tasks), tmp, engine=e.engine, shots=e.shots, limit=e.limit,
                                 max_new_tokens=e.max_new_tokens, chat=None if e.chat == "none" else e.chat,
                                 gsm8k_path=e.gsm8k_path, dip_mode=e.dip_mode, noise_sigmas=list(e.noise_sigmas),
                                 harness_tasks=list(e.harness_tasks), answer_nll=not a.no_answer_nll, dtype=e.dtype,
                                 context_bound=e.max_model_len, tensor_parallel_size=e.tensor_parallel_size,
                                 gpu_memory_utilization=e.gpu_memory_utilization, sampling=e.sampling())
    for t, r in res["tasks"].items():
        print(f"{t}: " + "  ".join(f"{k} {v['accuracy']:.4f}" for k, v in r["scores"].items()) + f"  (n={r['n']})")
        if r.get("sampled"):
            s = r["sampled"]
            print(f"{t}: " + "  ".join(f"{k} {v['accuracy']:.4f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                                       for k, v in s["metrics"].items() if k.startswith("flexible"))
                  + f"  distinct answers {s['diversity']['distinct_answers']:.2f}/{s['n']}")
    for t, m in res.get("harness", {}).items():
        print(f"{t} (lm-eval): " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    print(f"results: {Path(a.out) / 'results.json'}")
    return 0


def cmd_serve(a) -> int:
    from dipnet.eval.serve import serve

    if not 0 < a.port < 65536:
        raise UsageError(f"--port: expected 1-65535, got {a.port}")
    return serve(a.model_dir, host=a.host, port=a.port, workdir=a.workdir)


def cmd_report(a) -> int:
    from dipnet.pipeline.recipe import Recipe
    from dipnet.pipeline.report import headline_table, write_report

    from pydantic import ValidationError

    from dipnet.pipeline.recipe import format_validation_error, read_yaml

    run_dir = Path(a.run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise UsageError(f"{run_dir}: not a run directory (no manifest.json)")
    recipe = None
    if (run_dir / "recipe.yaml").is_file():
        try:
            recipe = Recipe.model_validate(read_yaml(run_dir / "recipe.yaml"))
        except ValidationError as exc:
            raise UsageError(format_validation_error(exc, str(run_dir / "recipe.yaml"))) from None
    paths = write_report(run_dir, recipe, smoothness=False if a.no_smoothness else None)
    print(headline_table(paths["report_md"]))
    print(f"report: {paths['report_md']}")
    return 0


def cmd_smoothness(a) -> int:
    from dipnet.pipeline.smoothness import measure_smoothness

    if a.limit <= 0 or not (a.epsilon > 0 and a.epsilon < float("inf")):
        raise UsageError(f"--limit must be > 0 and --epsilon a positive number (got {a.limit}, {a.epsilon})")

    res = measure_smoothness(a.model_dir, task_name=a.task, limit=a.limit, epsilon=a.epsilon, data=a.data)
    text = json.dumps(res, indent=2)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return 0


def cmd_launch(a) -> int:
    from dipnet.launch.slurm import launch_slurm
    from dipnet.pipeline.recipe import load_recipe
    from dipnet.pipeline.run import Manifest, Run

    def completed(stage: str, recipe) -> bool:
        run = Run(recipe, progress=False)
        return Manifest(run.dir).is_complete(stage, run.stage_inputs(stage))

    return launch_slurm(load_recipe(a.recipe, a.overrides), a, completed)


def cmd_status(a) -> int:
    from dipnet.launch.slurm import status

    return status(a.run_dir, wait=a.wait, timeout=a.timeout)


def cmd_env(a) -> int:
    from dipnet.pipeline.env import collect_env, format_env

    env = collect_env(deepspeed_ops=not a.no_ops)
    print(json.dumps(env, indent=2) if a.json else format_env(env))
    return 0


def cmd_cancel(a) -> int:
    from dipnet.launch.slurm import cancel

    return cancel(a.run_dir)


def _quiet(debug: bool) -> None:
    """Library chatter (progress bars, warnings) off, so a failure ends in one `error:` line."""
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if not Path("/proc/driver/nvidia").exists():  # else DeepSpeed warns that it "falls back" to the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not debug:
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    note_usr1_in_job()  # before anything slow: Slurm's USR1 must never kill a dipnet job
    omp_wait_for_shared_cores()
    debug = "--debug" in argv
    _quiet(debug)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # KEY=VALUE overrides may also come after options (`launch R --slurm train.lr=1`).
        if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        elif extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        return globals()[f"cmd_{args.command}"](args)
    except DipnetError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only file system, a permission: the path and what to do
        if debug:
            raise
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # an unexpected failure still gets one line without --debug
        if debug:
            raise
        msg = " ".join(str(exc).split())[:300]
        print(f"error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    except BaseException as exc:  # run.Preempted: the stage saved and the job was requeued
        if type(exc).__name__ == "Preempted":
            print("preempted: the job resumes from its latest checkpoint when Slurm starts it again", file=sys.stderr)
            return 0
        raise


OS_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full: free space there, or write elsewhere (run.output_dir, --out)",
    errno.EDQUOT: "the disk quota is used up: free space there, or write elsewhere (run.output_dir, --out)",
    errno.EROFS: "a read-only file system: write elsewhere (run.output_dir, --out)",
    errno.EACCES: "permission denied: write elsewhere (run.output_dir, --out) or fix the permissions",
    errno.EPERM: "operation not permitted: write elsewhere (run.output_dir, --out) or fix the permissions",
}


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system failure: the path, what happened, what to change. Whatever
    dipnet was writing was under a temporary name and has been removed (outputs.output_dir)."""
    path = exc.filename if exc.filename is not None else "(no path)"
    if exc.filename2 is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        path = exc.filename2  # a copy (shutil) names its source first; the full disk is the destination's
    hint = OS_ERROR_HINTS.get(exc.errno, exc.strerror or type(exc).__name__)
    return f"{path}: {hint}"


if __name__ == "__main__":
    sys.exit(main())
