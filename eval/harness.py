"""lm-evaluation-harness tasks on a dipnet model, from local data, through dipnet's engines.

    dipnet eval MODEL_DIR --harness-tasks gsm8k,dipnet_arith_id --out DIR
    eval.harness_tasks: [gsm8k, arc_easy]          (recipe: evaluated for every model)

- engine vllm: lm-eval drives dipnet's own vLLM engine through its LM API (`DipnetVllmLM`:
  generation with lm-eval's stop handling, log-likelihoods from vLLM prompt logprobs), the
  same engine and settings as `dipnet eval`; engine hf: lm-eval's own `HFLM`.
- Local data: `gsm8k` and `gsm8k_cot` are lm-eval's own task files (included unchanged) with the
  data pointed at the local GSM8K copy; `dipnet_arith_id`, `dipnet_arith_ood`, `dipnet_arith_val`
  register dipnet's synthetic splits as harness tasks (the gsm8k prompt, filters and metric), so
  lm-eval users can run them with `lm_eval --include_path DIR/tasks`.
- Every other task is lm-eval's, unchanged; the hub is never contacted (HF_*_OFFLINE): a task
  whose data is not already in the local datasets cache fails with one line naming it.
- Output: lm-eval's own results_*.json and samples_*.jsonl (its EvaluationTracker) under
  DIR/harness, and a summary {task: {metric: value}} for dipnet's results and report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dipnet.eval.tasks import encode_prompt, load_gsm8k
from dipnet.pipeline.errors import UsageError

LM_EVAL_VERSION = "0.4.13"
LOCAL_TASKS = ("gsm8k", "gsm8k_cot", "dipnet_arith_id", "dipnet_arith_ood", "dipnet_arith_val")
ARITH_SPLITS = {"dipnet_arith_id": "test-id", "dipnet_arith_ood": "test-ood", "dipnet_arith_val": "val"}


def _lm_eval():
    try:
        import lm_eval
        from importlib.metadata import version
    except ImportError:
        raise UsageError(f"eval.harness_tasks needs lm-evaluation-harness: pip install lm-eval=={LM_EVAL_VERSION}") from None
    if version("lm-eval") != LM_EVAL_VERSION:
        raise UsageError(f"eval.harness_tasks is built against lm-eval {LM_EVAL_VERSION}, found {version('lm-eval')}")
    return lm_eval


def write_local_tasks(dest: Path, *, gsm8k_path: str | None, synthetic_settings=None) -> Path:
    """Task YAMLs (and the synthetic data) under dest; returns the directory for lm-eval's
    include_path. GSM8K files are written only when a local copy exists."""
    lm_eval = _lm_eval()
    from dipnet.pipeline import synthetic
    from dipnet.pipeline.recipe import SyntheticSettings

    dest.mkdir(parents=True, exist_ok=True)
    gsm8k_yamls = Path(lm_eval.__file__).parent / "tasks" / "gsm8k"
    from dipnet.eval.tasks import default_gsm8k_dir

    gdir = Path(gsm8k_path) if gsm8k_path else default_gsm8k_dir()
    if gdir is not None:
        load_gsm8k(gdir)  # one-line error if train/test are missing
        files = {"train": str((gdir / "train.jsonl").resolve()), "test": str((gdir / "test.jsonl").resolve())}
        for name, src in (("gsm8k", "gsm8k.yaml"), ("gsm8k_cot", "gsm8k-cot.yaml"),
                          ("gsm8k_cot_self_consistency", "gsm8k-cot-self-consistency.yaml")):
            # lm-eval's own task, unchanged but for where its data comes from (JSON strings are YAML).
            (dest / f"{name}.yaml").write_text(
                f"include: {json.dumps(str(gsm8k_yamls / src))}\ntask: {name}\ndataset_path: json\n"
                f"dataset_name: null\ndataset_kwargs:\n  data_files: {json.dumps(files)}\n")
    s = synthetic_settings or SyntheticSettings()
    splits = synthetic.generate_splits(s.n_train, s.n_test, s.seed)
    (dest / "data").mkdir(exist_ok=True)
    for split in ("train", *ARITH_SPLITS.values()):
        (dest / "data" / f"arith-{split}.jsonl").write_text(
            "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in splits[split]))
    for name, split in ARITH_SPLITS.items():
        files = {"train": str((dest / "data" / "arith-train.jsonl").resolve()),
                 "test": str((dest / "data" / f"arith-{split}.jsonl").resolve())}
        (dest / f"{name}.yaml").write_text(
            f"include: {json.dumps(str(gsm8k_yamls / 'gsm8k.yaml'))}\ntask: {name}\ntag: dipnet_arith\n"
            f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files: {json.dumps(files)}\n"
            "num_fewshot: 0\nmetadata:\n  version: 1.0\n")
    return dest


def make_lm(engine: str, model_dir: str | Path, *, vllm_engine=None, max_length: int | None = None,
            trust_remote_code: bool = False, sampling_seed: int = 0):
    """The lm-eval LM object for an engine name."""
    _lm_eval()
    if engine == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=8,
                    trust_remote_code=trust_remote_code, max_length=max_length)
    return DipnetVllmLM(model_dir, vllm_engine, max_length or 2048, trust_remote_code=trust_remote_code,
                        sampling_seed=sampling_seed)


def _dipnet_vllm_lm_class():
    from lm_eval.api.model import TemplateLM

    class DipnetVllmLM(TemplateLM):
        """dipnet's VllmEngine behind lm-eval's LM API (generation and log-likelihoods)."""

        def __init__(self, model_dir, engine, max_length: int, trust_remote_code: bool = False, sampling_seed: int = 0):
            super().__init__()
            from dipnet.pipeline.models import load_tokenizer

            self.tokenizer = load_tokenizer(model_dir, trust_remote_code)
            self.engine, self.max_length, self.sampling_seed = engine, max_length, sampling_seed

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            t = self.tokenizer
            return t.bos_token_id if t.bos_token_id is not None else t.eos_token_id

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            if add_special_tokens is None:  # lm-eval's vLLM rule: the tokenizer's own, BOS never doubled
                return encode_prompt(self.tokenizer, string)
            return self.tokenizer(string, add_special_tokens=add_special_tokens).input_ids

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            seqs, spans = [], []
            for _, ctx, cont in requests:
                inp = (ctx + cont)[-self.max_length:]
                seqs.append(inp)
                spans.append(min(len(cont), len(inp) - 1))
            out = []
            for lps, n in zip(self.engine.prompt_logprobs(seqs), spans):
                tail = lps[len(lps) - n:]
                out.append((sum(lp for lp, _ in tail), all(rank == 1 for _, rank in tail)))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            out = []
            for (text,) in (r.args for r in requests):
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1)]
                scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows])
                out.append(sum(s for s, _ in scores))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            from lm_eval.models.utils import handle_stop_sequences

            eos = self.tokenizer.decode(self.eot_token_id)
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
            out = [""] * len(requests)
            for key, idx in groups.items():
                kw = json.loads(key)
                stops = handle_stop_sequences(kw.get("until"), eos=eos)
                # lm-eval keeps the last max_length - max_gen_toks prompt tokens; a model whose
                # context is shorter than max_gen_toks keeps half of it for the prompt.
                new = min(int(kw.get("max_gen_toks", 256)), self.max_length // 2)
                if kw.get("do_sample") or (kw.get("temperature") or 0) > 0:
                    self._sample(requests, idx, kw, new, stops, out)
                    continue
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - new):] for i in idx]
                for i, (text, _) in zip(idx, self.engine.generate(prompts, new, stops)):
                    out[i] = text
            return out

        def _sample(self, requests, idx, kw: dict, new: int, stops: list[str], out: list) -> None:
            """A sampled task (lm-eval's `repeats`, e.g. gsm8k_cot_self_consistency's 64) arrives as
            identical requests: one n-sampled call per prompt, so its prefill is paid once."""
            from dipnet.eval.sampling import Sampling

            by_prompt: dict[str, list[int]] = {}
            for i in idx:
                by_prompt.setdefault(requests[i].args[0], []).append(i)
            by_count: dict[int, list[str]] = {}
            for text, where in by_prompt.items():
                by_count.setdefault(len(where), []).append(text)
            for n, texts in by_count.items():
                sampling = Sampling(n=n, temperature=float(kw.get("temperature") or 1.0),
                                    top_p=float(kw.get("top_p") or 1.0), top_k=int(kw.get("top_k") or 0),
                                    seed=self.sampling_seed)
                prompts = [self.tok_encode(t)[-(self.max_length - new):] for t in texts]
                for text, group in zip(texts, self.engine.sample(prompts, new, stops, sampling)):
                    for i, (completion, _) in zip(by_prompt[text], group):
                        out[i] = completion

    return DipnetVllmLM


def DipnetVllmLM(*args, **kwargs):  # the class needs lm-eval importable: build it on first use
    return _dipnet_vllm_lm_class()(*args, **kwargs)


def prepare_harness(task_names: list[str], out_dir: Path, *, gsm8k_path: str | None = None,
                    synthetic_settings=None):
    """Write the local task files and load every task (its data) before any engine starts; a task
    lm-eval lacks, or whose data would need the hub, fails here in one line. Returns the TaskManager."""
    _lm_eval()
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})  # never the hub
    from lm_eval.tasks import TaskManager

    out_dir.mkdir(parents=True, exist_ok=True)
    include = write_local_tasks(out_dir / "tasks", gsm8k_path=gsm8k_path, synthetic_settings=synthetic_settings)
    tm = TaskManager(include_path=str(include))
    for name in task_names:
        if name in ("gsm8k", "gsm8k_cot") and not (include / f"{name}.yaml").is_file():
            raise UsageError(f"harness task {name}: no local GSM8K copy (eval.gsm8k_path, a directory with "
                             "train.jsonl/test.jsonl); the hub is never used")
        if name not in tm.all_tasks:
            raise UsageError(f"harness task '{name}': lm-eval {LM_EVAL_VERSION} has no such task")
        try:
            tm.load([name])
        except Exception as exc:  # a task whose data is neither local nor in the datasets cache
            raise UsageError(f"harness task {name}: its data is not available offline "
                             f"({' '.join(str(exc).split())[:160]}); local data works for {', '.join(LOCAL_TASKS)}, "
                             "or fill the datasets cache (HF_DATASETS_CACHE) on a connected machine first") from None
    return tm


def run_harness(model_dir: str | Path, task_names: list[str], out_dir: Path, task_manager, *, engine: str = "vllm",
                vllm_engine=None, limit: int | None = None, max_length: int | None = None,
                max_gen_toks: int = 256, trust_remote_code: bool = False, sampling_seed: int = 0) -> dict:
    """Run lm-eval tasks on model_dir; lm-eval's files under out_dir; returns {task: {metric: value}}.

    `max_gen_toks` other than lm-eval's 256 (eval.max_new_tokens) overrides the tasks' budget."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    lm = make_lm(engine, model_dir, vllm_engine=vllm_engine, max_length=max_length, trust_remote_code=trust_remote_code,
                 sampling_seed=sampling_seed)
    tracker = EvaluationTracker(output_path=str(out_dir))
    try:
        res = simple_evaluate(model=lm, tasks=list(task_names), task_manager=task_manager, limit=limit,
                              log_samples=True, evaluation_tracker=tracker, bootstrap_iters=0,
                              gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks != 256 else None,
                              random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    except UsageError:
        raise
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UsageError(f"harness tasks {','.join(task_names)}: lm-eval failed: {msg}") from None
    samples = res.pop("samples")
    # lm-eval names its folder after the model; ours has no hub name: call it after the directory.
    tracker.general_config_tracker.model_name_sanitized = "".join(
        c if c.isalnum() or c in "_-." else "_" for c in Path(model_dir).name) or "model"
    tracker.save_results_aggregated(results=res, samples=samples)
    for name in res["results"]:
        if name in samples:
            tracker.save_results_samples(task_name=name, samples=samples[name])
    return {name: {k: v for k, v in m.items() if isinstance(v, (int, float)) and "_stderr," not in k
                   and k not in ("alias", "sample_len")} for name, m in res["results"].items()}
