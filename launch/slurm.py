"""Slurm: render stage jobs from `launch/slurm/stage.sbatch`, submit them as a dependency chain,
follow and cancel them.

    dipnet launch RECIPE --slurm --nodes 2 --gpus-per-node 8 [--dry-run]
    dipnet status RUN_DIR [--wait]
    dipnet cancel RUN_DIR

The chain is preprocess (base, convert, preprocess) -> train -> export -> eval (eval, report),
each `sbatch --dependency=afterok:PREV --kill-on-invalid-dep=yes`, so a failed stage cancels the
rest. Every job runs `dipnet run RECIPE --only STAGES` on the run directory (a shared file
system), so skipping and resuming work exactly as without Slurm. Inside the train job the train
stage spawns ranks with one srun task per node running torchrun (c10d rendezvous on the head
node from `scontrol show hostnames`, node rank from SLURM_NODEID), or with the deepspeed
launcher (`--launcher slurm`, hostfile written from the node list).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from string import Template

import yaml

from dipnet.launch.local import TRAIN_MODULE
from dipnet.pipeline.env import in_slurm_job  # noqa: F401 (launch.slurm's API; env.py holds it for the CLI's first line)
from dipnet.pipeline.errors import RunError, UsageError

TEMPLATE = Path(__file__).resolve().parent / "sbatch" / "stage.sbatch"  # package data
CHAIN = [("preprocess", "base,convert,preprocess"), ("train", "train"), ("export", "export"), ("eval", "eval,report")]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
JOB_ID = re.compile(r"\d+(_\d+)?")


def slurm_settings(recipe, args) -> dict:
    """Recipe's launch.slurm with the command line's flags on top, validated like the recipe."""
    from pydantic import ValidationError

    from dipnet.pipeline.recipe import SlurmSettings, _describe_expected

    s = recipe.launch.slurm.model_dump()
    for key in ("nodes", "gpus_per_node", "cpus_per_task", "partition", "time", "account", "launcher"):
        val = getattr(args, key, None)
        if val is not None:
            s[key] = val
    try:
        s = SlurmSettings.model_validate(s).model_dump()
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0])
        raise UsageError(f"--{key.replace('_', '-')} (launch.slurm.{key}): {_describe_expected(err)}, "
                         f"got {err.get('input')!r}") from None
    if s["cpus_per_task"] is None:
        s["cpus_per_task"] = max(2, 4 * s["gpus_per_node"]) if s["gpus_per_node"] else (os.cpu_count() or 2)
    return s


def procs_per_node(recipe, s: dict) -> int:
    return s["gpus_per_node"] or recipe.launch.procs_per_node or 2


SHELL_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f'\"`$\\;&|<>(){}*?!#~]")


def check_job_path(p: Path, what: str) -> None:
    """#SBATCH lines are parsed by sbatch, not the shell: a path there must be one plain word."""
    if SHELL_UNSAFE.search(str(p)):
        raise UsageError(f"{what} {p}: contains spaces, quotes or shell characters; Slurm job files need a plain "
                         "path (set run.output_dir)")


def render_job(recipe, recipe_path: Path, run_dir: Path, stage_name: str, stages: str, s: dict) -> str:
    """The sbatch script of one stage job. Every value was validated (recipe.SlurmSettings, run.name,
    check_job_path) and everything the shell reads is quoted."""
    check_job_path(run_dir, "run directory")
    train = stage_name == "train"
    lines = []
    if s["partition"]:
        lines.append(f"#SBATCH --partition={s['partition']}")
    if s["time"]:
        lines.append(f"#SBATCH --time={s['time']}")
    if s["account"]:
        lines.append(f"#SBATCH --account={s['account']}")
    gpu_job = bool(s["gpus_per_node"]) and stage_name in ("train", "eval")
    if gpu_job:  # train: every GPU of every node; eval: vLLM (and the hf engine) on eval_gpus
        lines.append(f"#SBATCH --gpus-per-node={s['gpus_per_node'] if train else s['eval_gpus']}")
    mem, why = (s["mem"], "launch.slurm.mem") if s["mem"] is not None else estimate_mem(recipe, s, stage_name)
    lines += [f"# --mem: {comment_text(why)}", f"#SBATCH --mem={mem}"]  # a comment after an option would be sbatch's to parse
    margin, margin_why = ((s["signal_margin_s"], "launch.slurm.signal_margin_s") if s["signal_margin_s"] is not None
                          else estimate_signal_margin(recipe, s, stage_name))
    if margin != DEFAULT_SIGNAL_MARGIN_S or s["signal_margin_s"] is not None:
        lines.append(f"# USR1 margin: {comment_text(margin_why)}")
    if gpu_job and not train:
        lines.append(f"# vLLM: one engine, {comment_text(eval_engine_comment(recipe, s['eval_gpus']))}; "
                     f"eval.gpu_memory_utilization {recipe.eval.gpu_memory_utilization}")
    for extra in s["extra_sbatch"]:
        lines.append(extra if extra.startswith("#SBATCH") else f"#SBATCH {extra}")
    env = []
    if not s["gpus_per_node"]:
        env.append("export DS_ACCELERATOR=cpu")
    elif gpu_job:
        env.append("export DIPNET_DEVICE=cuda  # a rank without a usable GPU stops with one line instead of crawling on the CPU")
        # NCCL: warnings in the job log, and a failed collective (a dead peer) raises in every
        # rank instead of hanging until the process-group timeout. launch.slurm.env overrides
        # both, and is where the socket interface goes (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME).
        env += [f"export {k}={v}" for k, v in NCCL_DEFAULTS.items() if k not in s["env"]]
    env += [f"export {k}={shlex.quote(str(v))}" for k, v in s["env"].items()]
    if stage_name != CHAIN[0][0]:
        # The first job put the model, tokenizer and data into the run directory: compute nodes
        # are often offline, and nothing after it needs the network.
        env.append("export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1")
    return Template(TEMPLATE.read_text()).substitute(
        job_name=f"dipnet-{recipe.run.name}-{stage_name}", nodes=s["nodes"] if train else 1,
        cpus_per_task=s["cpus_per_task"], log=str(run_dir / "slurm" / f"{stage_name}-%j.log"),
        sbatch_lines="\n".join(lines), env_lines="\n".join(env), launcher=s["launcher"],
        procs_per_node=procs_per_node(recipe, s), stages=stages, workdir=shlex.quote(str(Path.cwd())),
        signal_margin=margin, python=shlex.quote(sys.executable), recipe=shlex.quote(str(recipe_path)))


def comment_text(text: str) -> str:
    """Text for one `#` line of the job script: names in it (a model directory's) must stay in the comment."""
    return re.sub(r"[\x00-\x1f\x7f]", "?", text)


NCCL_DEFAULTS = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
GiB = 2**30
MODEL_SIZE_IN_NAME = re.compile(r"(?<![A-Za-z0-9.])(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z0-9])")


def local_config_path(recipe) -> Path | None:
    """The base model's config.json where it can be read here without the network: a local
    directory or an imported GGUF model (a hub name's config is not fetched to render a job)."""
    from dipnet.pipeline.pretrained import is_gguf_spec, pretrained_dir

    base = recipe.model.base
    if base == "tiny":
        return None
    if Path(base).is_dir():
        cfg_path = Path(base) / "config.json"
    elif is_gguf_spec(base) and not base.endswith(".gguf"):
        cfg_path = pretrained_dir(base, recipe.model.dtype) / "config.json"
    else:
        return None
    return cfg_path if cfg_path.is_file() else None


def eval_engine_comment(recipe, gpus: int) -> str:
    """What the eval job's vLLM engine does with its GPUs, as far as it can be known here."""
    from dipnet.eval.vllm_runner import tensor_parallel_size

    if recipe.eval.tensor_parallel_size:
        return f"tensor_parallel_size={recipe.eval.tensor_parallel_size} (eval.tensor_parallel_size) on {gpus} GPU(s)"
    from dipnet.pipeline.readers import read_json_object

    cfg_path = local_config_path(recipe)
    if cfg_path is not None:
        try:
            size = tensor_parallel_size(read_json_object(cfg_path), gpus)
        except UsageError:
            pass  # an unreadable config: the engine reads it again when the job starts, and says why
        else:
            return (f"tensor_parallel_size={size} of {gpus} GPU(s): the most that divides "
                    f"{cfg_path.parent.name}'s attention and KV heads")
    return (f"tensor_parallel_size={gpus} (all {gpus} GPU(s)), or the most of them that divides the "
            f"model's attention and KV heads, read from its config when the job starts")


def model_parameters(recipe) -> tuple[float | None, str]:
    """The base model's parameter count and where it came from: its config where one can be read
    here without the network (a local directory, an imported GGUF model, the tiny base's
    settings), else the size its name states ('Qwen/Qwen2.5-7B': 7e9), else None."""
    base = recipe.model.base
    cfg_path = None
    if base == "tiny":
        t = recipe.model.tiny
        h, layers, vocab = t.hidden_size, t.num_layers, t.vocab_size
        return float(layers * (4 * h * h + 3 * h * t.intermediate_size) + 2 * vocab * h), "the tiny base's settings"
    cfg_path = local_config_path(recipe)
    if cfg_path is not None:
        from dipnet.pipeline.models import meta_model
        from dipnet.pipeline.errors import DipnetError

        try:
            n = sum(p.numel() for p in meta_model(cfg_path.parent).parameters())
            return float(n), f"{cfg_path.parent.name}'s config"
        except DipnetError:
            pass  # a config transformers cannot build: fall back to the name
    m = MODEL_SIZE_IN_NAME.search(Path(base).name)
    if m:
        return float(m.group(1)) * (1e9 if m.group(2) in "Bb" else 1e6), f"the size in the name '{base}'"
    return None, ""


DEFAULT_SIGNAL_MARGIN_S = 180
# What a checkpoint of a full fine-tune holds per trained parameter: the weights in the training
# dtype (bf16 2 bytes, fp32 4) plus AdamW's float32 master copy and two moments (12), as measured
# on DeepSpeed ZeRO-2 checkpoints (bench/checkpoint_save.py).
OPTIMIZER_BYTES_PER_PARAM = 12
# Save rate assumed per node, checksums included: what the 2-core development machine measured
# (0.22-0.26 GB/s, bench/checkpoint_save.py), so a GPU node's disks and cores only leave more room.
# Too large a margin costs a few minutes of an hours-long job; too small loses the save at the
# limit. The trainer prints each save's time and warns when it takes more than half of the
# margin, so a real run's first save checks this assumption.
ASSUMED_WRITE_BYTES_PER_S = 0.25e9


def estimate_signal_margin(recipe, s: dict, stage_name: str) -> tuple[int, str]:
    """The USR1 margin of one stage job: 180 s, except a full fine-tune's train job, whose ranks
    must finish their step and write the whole optimizer state before the limit. Rank 0's node
    writes the weights and its share of the optimizer state; sized at twice that write at the
    assumed bandwidth plus a minute for the step in flight, never under 180 s."""
    if stage_name != "train" or recipe.train.method != "full":
        return DEFAULT_SIGNAL_MARGIN_S, "the default"
    n, source = model_parameters(recipe)
    if n is None:
        return DEFAULT_SIGNAL_MARGIN_S, "the default (the model's size is unknown here)"
    width = 2 if recipe.train.precision == "bf16" else 4
    nodes = s["nodes"]
    head_bytes = n * width + n * OPTIMIZER_BYTES_PER_PARAM / nodes
    write_s = head_bytes / ASSUMED_WRITE_BYTES_PER_S
    margin = max(DEFAULT_SIGNAL_MARGIN_S, math.ceil(2 * write_s + 60))
    return margin, (f"a full fine-tune of {n / 1e9:.3g}B parameters ({source}): the head node writes "
                    f"~{head_bytes / 1e9:.0f} GB per checkpoint, {write_s:.0f} s at an assumed "
                    f"{ASSUMED_WRITE_BYTES_PER_S / 1e9:g} GB/s; twice that plus 60 s for the step in flight")


def estimate_mem(recipe, s: dict, stage_name: str) -> tuple[str, str]:
    """sbatch --mem for one stage job, from the model's size and what the stage holds in host memory
    (docs/cluster.md, "Host memory per rank while loading": ZeRO-0-2 keep the whole model on every rank
    while loading, ~2 bytes per parameter in bf16; ZeRO-3 partitions as it loads, ~1.2), plus ~3 GiB
    per process (torch, DeepSpeed, a CUDA context) and a quarter for headroom. Export verifies in
    float32 (8 bytes per parameter); vLLM loads the model once beside its KV cache. When submitting,
    `s["node_mem_mb"]` (sinfo) caps it: an estimate beyond the nodes' memory asks for a whole node
    instead of a job Slurm refuses outright."""
    n, source = model_parameters(recipe)
    if n is None:
        return "0", "the model's size is unknown here: all of the node's memory; set launch.slurm.mem"
    t = recipe.train
    width = 2 if t.precision == "bf16" else 4
    if stage_name == "train":
        ranks = procs_per_node(recipe, s)
        need = ranks * (width * n * (0.6 if t.zero_stage == 3 else 1.0) + 3 * GiB)
        if t.offload and t.method == "full":  # fp32 master, momentum and variance of this node's share
            need += 12 * n / s["nodes"]
    elif stage_name == "export":
        need = 8 * n + 3 * GiB
    elif stage_name == "eval":
        need = width * n + 6 * GiB  # vLLM's CPU KV cache is at most 4 GiB (eval/vllm_runner.py)
    else:  # base, convert, preprocess: one process; convert holds the model once in float32
        need = 4 * n + 3 * GiB
    gib = max(4, math.ceil(1.25 * need / GiB))
    size = f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"
    why = f"estimated from {size} parameters ({source}); launch.slurm.mem overrides"
    node_mb = s.get("node_mem_mb")
    if node_mb and gib * 1024 > node_mb:
        return "0", f"{why}: {gib}G exceeds the nodes' {node_mb} MB, so the whole node"
    return f"{gib}G", why


def partition_memory_mb(partition: str | None) -> int | None:
    """The smallest node memory (MB) of `partition` (or the default one) by sinfo; None if unknown."""
    if shutil.which("sinfo") is None:
        return None
    res = subprocess.run(["sinfo", "-h", "-o", "%P|%m"], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    sizes = {}
    for line in res.stdout.split():
        name, _, mem = line.partition("|")
        mem = mem.rstrip("+")
        if mem.isdigit():
            sizes.setdefault(name.rstrip("*") if partition else ("*" if name.endswith("*") else name), []).append(int(mem))
    found = sizes.get(partition or "*")
    return min(found) if found else None


def interface_holding(addr: str) -> str | None:
    """The network interface of this host that holds IPv4 address `addr` (from `ip -o addr`)."""
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():  # "3: eth0    inet 10.0.0.2/24 brd ... scope global eth0"
        parts = line.split()
        if len(parts) > 3 and parts[2] == "inet" and parts[3].split("/")[0] == addr:
            return parts[1]
    return None


def node_socket_env(env: dict | None = None) -> dict[str, str]:
    """GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) for a rank of a multi-node Slurm job that set
    neither: the interface that carries this node's Slurm address (NodeAddr).

    Without it gloo binds the address the host's own name resolves to, which on many clusters
    (Debian's `127.0.1.1 <hostname>` line) is loopback: every rank then gets `Connection refused`.
    Where no interface holds NodeAddr and the name is loopback, one line says what to set."""
    import socket

    env = os.environ if env is None else env
    if int(env.get("SLURM_NNODES", "1") or 1) < 2 or "GLOO_SOCKET_IFNAME" in env:
        return {}
    node = env.get("SLURMD_NODENAME", "")
    addr = ""
    if node and re.fullmatch(r"[A-Za-z0-9._-]+", node):
        try:
            out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, timeout=30).stdout
            m = re.search(r"NodeAddr=(\S+)", out)
            addr = m.group(1) if m else ""
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        ip = socket.gethostbyname(addr) if addr else ""
    except OSError:
        ip = ""
    ifname = interface_holding(ip) if ip else None
    if ifname and ifname != "lo":
        chosen = {"GLOO_SOCKET_IFNAME": ifname}
        if "NCCL_SOCKET_IFNAME" not in env:
            chosen["NCCL_SOCKET_IFNAME"] = ifname
        return chosen
    host = socket.gethostname()
    try:
        own = socket.gethostbyname(host)
    except OSError:
        own = ""
    if own.startswith("127."):
        raise RunError(f"node {node or host}: its host name '{host}' resolves to {own} (loopback) and no interface "
                       f"holds its Slurm address {addr or '(unknown)'}: ranks on other nodes could not reach it; set "
                       f"launch.slurm.env.GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the interface between nodes")
    return {}


def slurm_train_command(script_args: list[str], procs: int, module: str = TRAIN_MODULE) -> list[str]:
    """Inside a dipnet train job: spawn `procs` ranks of the training module on every node.

    torchrun: one srun task per node with all of the node's CPUs (srun hands a step one CPU per
    task unless told: ranks would share it), torchrun spawning the node's ranks, a static
    rendezvous on the head node.
    deepspeed: `deepspeed --launcher slurm` runs `srun -n nodes×procs` itself; each task finds
    its rank in SLURM_PROCID/SLURM_LOCALID (pipeline/train.py). It starts a script, not a module.
    """
    import importlib.util

    launcher = os.environ.get("DIPNET_SLURM_LAUNCHER", "torchrun")
    py = shlex.quote(sys.executable)
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
    if launcher == "deepspeed":
        flag = "--out" if "--out" in script_args else "--runs"
        where = Path(script_args[script_args.index(flag) + 1])
        hostfile = (where if flag == "--out" else where.parent) / "hostfile"
        ds = shlex.quote(str(Path(sys.executable).parent / "deepspeed"))
        script = importlib.util.find_spec(module).origin  # located, not imported
        per_rank = f' --launcher_args=--cpus-per-task={max(1, cpus // procs)}' if cpus else ""
        args = " ".join(shlex.quote(a) for a in [script] + script_args)
        # No ssh check (srun starts the ranks); --num_gpus only on GPU nodes: DeepSpeed passes it to
        # srun as --gpus-per-node, which CPU nodes refuse; the hostfile's slots give ranks per node.
        gpus = f" --num_gpus {procs}" if os.environ.get("DS_ACCELERATOR") != "cpu" else ""
        inner = (f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots={procs}/" > {shlex.quote(str(hostfile))} && '
                 f'exec {ds} --hostfile {shlex.quote(str(hostfile))} --launcher slurm --no_ssh_check{per_rank} '
                 f'--num_nodes "$SLURM_NNODES"{gpus} --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" {args}')
        return ["bash", "-c", inner]
    args = " ".join(shlex.quote(a) for a in ["-m", module] + script_args)
    # Static rendezvous: node 0 (SLURM_NODEID) hosts the store at MASTER_ADDR:MASTER_PORT. (c10d
    # decides who hosts by matching the endpoint against the host's own name, which fails where
    # that name resolves to a loopback address.)
    inner = (f'exec {py} -m torch.distributed.run --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" '
             f'--nproc_per_node {procs} --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" {args}')
    return ["srun", "--nodes", os.environ.get("SLURM_NNODES", "1"), "--ntasks-per-node", "1",
            *([f"--cpus-per-task={cpus}"] if cpus else []), "--kill-on-bad-exit=1", "bash", "-c", inner]


def parse_slurm_time(text: str) -> float | None:
    """Seconds in a Slurm duration ([D-]HH:MM:SS, MM:SS, ...); None for UNLIMITED/NOT_SET."""
    text = text.strip()
    if not text or not text[0].isdigit():
        return None
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = [int(x) for x in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, sec = parts[-3:]
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def job_seconds_left() -> float | None:
    """Time this Slurm job has left (squeue %L), or None outside a job / without a limit."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not JOB_ID.fullmatch(job) or shutil.which("squeue") is None:
        return None
    res = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True)
    return parse_slurm_time(res.stdout) if res.returncode == 0 else None


def signal_job_steps(sig: str = "TERM") -> None:
    """Signal the tasks of this job's steps (not the batch script), leaving the steps running.

    Sending SIGTERM to srun instead makes it cancel the step: its tasks are SIGKILLed before
    they can finish their step and save. slurmstepd delivers this to every task on every node
    (torchrun forwards it to its ranks; `deepspeed --launcher slurm` ranks are the tasks)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if not JOB_ID.fullmatch(job):
        return
    try:
        # When Slurm itself is taking the job down (scontrol requeue, scancel, the time limit's
        # SIGTERM), it signals every step on its own and refuses this ("Job can not be altered
        # now"), and scancel retries for up to a minute: this caller, the batch script, then held
        # the job's teardown until KillWait ran out (30 s per requeue, measured on the test cluster).
        subprocess.run(["scancel", f"--signal={sig}", job], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        pass


def requeue_this_job() -> bool:
    """Put this job back in the queue (it keeps its id, so dependent jobs keep waiting)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if not JOB_ID.fullmatch(job):
        return False
    try:
        return subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True).returncode == 0
    except OSError:  # no scontrol on this node's PATH
        return False


# ----------------------------------------------------------------------------- submit

def _sbatch() -> str:
    exe = shutil.which("sbatch")
    if exe is None:
        raise UsageError("sbatch not found: run `dipnet launch --slurm` on a Slurm login node (or use --dry-run)")
    return exe


def check_resources(s: dict, script: Path) -> None:
    """Refuse, in plain words, more nodes or CPUs than the partition has (sinfo). Slurm itself
    accepts such a job when --ntasks-per-node is set and leaves it pending forever."""
    res = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c"], capture_output=True, text=True)
    if res.returncode != 0:
        return  # sbatch will say what is wrong
    parts = {}
    for line in res.stdout.split():
        name, nodes, cpus = line.split("|")
        cpus = int(cpus.rstrip("+")) if cpus.rstrip("+").isdigit() else 10**9
        parts[name.rstrip("*")] = (int(nodes), cpus, name.endswith("*"))
    name = s["partition"] or next((n for n, v in parts.items() if v[2]), None)
    if name not in parts:
        return  # an unknown partition: sbatch's own message names it
    nodes, cpus, _ = parts[name]
    if s["nodes"] > nodes or s["cpus_per_task"] > cpus:
        raise UsageError(f"{script}: asks for {s['nodes']} node(s) x {s['cpus_per_task']} CPUs per task, but partition "
                         f"'{name}' has {nodes} node(s) with {cpus} CPUs each (sinfo)")


def launch_slurm(recipe, args, completed=lambda stage, recipe: False) -> int:
    """Render the chain for `recipe` (CLI flags in `args`) and submit it, skipping the jobs whose
    stages `completed(stage, recipe)` says are done (the pipeline decides that, not the launcher)."""
    if args.hostfile:
        raise UsageError("--hostfile is for the deepspeed launcher without Slurm (launch.hostfile); inside Slurm the "
                         "hostfile is written from the node list")
    s = slurm_settings(recipe, args)
    d = recipe.to_dict()
    d["run"]["output_dir"] = str(recipe.output_dir.resolve())
    from dipnet.pipeline.recipe import Recipe

    recipe = Recipe.model_validate(d)
    run_dir = recipe.output_dir
    recipe_path = run_dir / "slurm" / "recipe.yaml"
    chain = CHAIN
    until = getattr(args, "until", None)
    if until:
        chain = CHAIN[:[n for n, _ in CHAIN].index(until) + 1]
    if not args.dry_run and s["mem"] is None:
        s["node_mem_mb"] = partition_memory_mb(s["partition"])
    scripts = [(name, stages, render_job(recipe, recipe_path, run_dir, name, stages, s)) for name, stages in chain]
    if args.dry_run:
        for name, stages, text in scripts:
            print(f"# ---- {name} job (stages {stages}) ----")
            print(text)
        return 0
    sbatch = _sbatch()
    from dipnet.pipeline.outputs import claim_run_dir

    claim_run_dir(run_dir)
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    jobs, prev = [], None
    for name, stages, text in scripts:
        if all(completed(st, recipe) for st in stages.split(",")):
            print(f"{name}: completed earlier (skipped)")
            continue
        path = run_dir / "slurm" / f"{name}.sbatch"
        path.write_text(text)
        if not jobs:
            check_resources(s, run_dir / "slurm" / "train.sbatch")
        cmd = [sbatch, "--parsable", "--kill-on-invalid-dep=yes"]
        if prev:
            cmd.append(f"--dependency=afterok:{prev}")
        res = subprocess.run(cmd + [str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            msg = " ".join((res.stderr or res.stdout).split()) or f"exit {res.returncode}"
            if jobs:
                subprocess.run(["scancel"] + [j["job_id"] for j in jobs], capture_output=True)
            raise RunError(f"sbatch refused {path}: {msg}")
        job_id = res.stdout.strip().split(";")[0]
        jobs.append({"stage": name, "stages": stages, "job_id": job_id, "script": str(path),
                     "log": str(run_dir / "slurm" / f"{name}-{job_id}.log")})
        prev = job_id
        print(f"{name}: submitted job {job_id}")
    _write_jobs(run_dir, jobs)
    if jobs:
        print(f"job ids: {' '.join(j['job_id'] for j in jobs)}   (dipnet status {run_dir} --wait)")
    else:
        print("every stage is complete; nothing submitted")
    return 0


def _write_jobs(run_dir: Path, jobs: list[dict]) -> None:
    p = run_dir / "slurm" / "jobs.json"
    tmp = p.with_name("jobs.json.tmp")
    tmp.write_text(json.dumps({"submitted": time.time(), "jobs": jobs}, indent=2))
    os.replace(tmp, p)


def _read_jobs(run_dir: str | Path) -> tuple[Path, list[dict]]:
    from dipnet.pipeline.readers import read_json_object

    d = Path(run_dir)
    p = d / "slurm" / "jobs.json"
    if not d.is_dir():
        raise UsageError(f"{d}: no such run directory")
    if not p.is_file():
        raise UsageError(f"{d}: no Slurm jobs recorded (expected {p}; submit with dipnet launch --slurm)")
    jobs = read_json_object(p).get("jobs")
    if not isinstance(jobs, list):
        raise UsageError(f"{p}: expected a 'jobs' list")
    for j in jobs:
        # Job ids go to squeue/scancel as arguments: digits only, never an option.
        if not (isinstance(j, dict) and isinstance(j.get("job_id"), str) and JOB_ID.fullmatch(j["job_id"])
                and all(isinstance(j.get(k), str) for k in ("stage", "stages", "log"))):
            raise UsageError(f"{p}: malformed job entry {str(j)[:80]!r}")
    return d, jobs


# ----------------------------------------------------------------------------- status / cancel

def job_state(job_id: str) -> tuple[str, str]:
    """(state, reason) from squeue, else scontrol (for MinJobAge after the end)."""
    res = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True)
    if res.returncode == 0 and res.stdout.strip():
        state, _, reason = res.stdout.strip().partition("|")
        return state, reason
    res = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
    if res.returncode == 0:
        fields = dict(tok.split("=", 1) for tok in res.stdout.split() if "=" in tok)
        return fields.get("JobState", "UNKNOWN"), fields.get("Reason", "")
    return "UNKNOWN", "no longer known to Slurm"


def _stage_errors(run_dir: Path) -> dict[str, str]:
    """stage -> error recorded in the run's manifest.json (read as data; no pipeline import)."""
    from dipnet.pipeline.readers import read_json_object

    p = run_dir / "manifest.json"
    stages = read_json_object(p).get("stages", {}) if p.is_file() else {}
    return {k: str(v.get("error")) for k, v in stages.items() if isinstance(v, dict) and v.get("error")}


def settled_state(job_id: str, settle_s: float = 3.0) -> tuple[str, str]:
    """job_state, but a job that looks finished without COMPLETED is read again after a moment:
    a requeued job (preemption, time limit) passes through such a state on its way back to PENDING."""
    state, reason = job_state(job_id)
    if state in TERMINAL and state != "COMPLETED":
        time.sleep(settle_s)
        state, reason = job_state(job_id)
    return state, reason


def status(run_dir: str | Path, wait: bool = False, timeout: float = 3600, poll: float = 0.5) -> int:
    d, jobs = _read_jobs(run_dir)
    deadline = time.time() + timeout
    while True:
        states = [(j, *(settled_state(j["job_id"]) if wait else job_state(j["job_id"]))) for j in jobs]
        if not wait or all(s in TERMINAL for _, s, _ in states) or time.time() > deadline:
            break
        time.sleep(poll)
    stage_errors = _stage_errors(d)
    failed = None
    for j, state, reason in states:
        stages = j["stages"].split(",")
        errors = [stage_errors[st] for st in stages if st in stage_errors]
        extra = f"  ({reason})" if reason and reason not in ("None", "(null)") else ""
        print(f"{j['stage']:10s} job {j['job_id']:>8s}  {state}{extra}")
        if state in TERMINAL and state != "COMPLETED" and failed is None and state != "CANCELLED":
            failed = (j, state, errors)
    if failed:
        j, state, errors = failed
        print(f"\nstage {j['stage']} {state}: {errors[0] if errors else 'see its log'}")
        print(f"log: {j['log']}")
        log = Path(j["log"])
        if log.is_file():
            print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:]))
        return 1
    if wait and not all(s in TERMINAL for _, s, _ in states):
        print("timed out waiting for the chain")
        return 1
    return 0


def cancel(run_dir: str | Path) -> int:
    d, jobs = _read_jobs(run_dir)
    ids = [j["job_id"] for j in jobs]
    if shutil.which("scancel") is None:
        raise UsageError("scancel not found: not a Slurm node")
    subprocess.run(["scancel"] + ids, capture_output=True, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        live = [i for i in ids if job_state(i)[0] not in TERMINAL | {"UNKNOWN"}]
        if not live:
            break
        time.sleep(0.5)
    for j in jobs:
        print(f"{j['stage']:10s} job {j['job_id']:>8s}  {job_state(j['job_id'])[0]}")
    return 0
