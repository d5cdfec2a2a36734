"""Starting the distributed training entry point on this machine (or across a hostfile).

`train_command(...)` builds the command for `launch.launcher`:
- `deepspeed`: `deepspeed --num_gpus N --master_port P [--hostfile F --num_nodes K --master_addr A] --module M ...`
  (on CPU `--num_gpus` means processes);
- `torchrun`: `torchrun --nproc_per_node N --master_port P -m M ...`;
- `single`: one process with RANK/WORLD_SIZE/MASTER_* set, as DeepSpeed needs without a launcher.

`run_ranks(...)` runs it in its own process group, streams its output to a log, and on any
failure or Ctrl-C takes the whole group down (SIGTERM, then SIGKILL after a grace period), so
no rank is ever left running.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dipnet.pipeline.errors import RunError, UsageError
from dipnet.pipeline.recipe import HOST_NAME

# The distributed entry point, started as a module (`python -m`, `deepspeed --module`,
# `torchrun -m`): launchers need its name, never its code.
TRAIN_MODULE = "dipnet.pipeline.train"


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def default_procs_per_node() -> int:
    if has_cuda():
        import torch

        return torch.cuda.device_count()
    return 2


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_master_port(requested: int | None) -> int:
    """The requested port if free; none requested: a free one. A busy requested port is an error."""
    if requested is None:
        return free_port()
    if not port_is_free(requested):
        raise UsageError(f"launch.master_port {requested} is already in use; free it, set another "
                         "(launch.master_port=PORT), or remove the key to pick a free port automatically")
    return requested


def rank_env(procs: int, port: int) -> dict[str, str]:
    """Environment every rank inherits: CPU accelerator, threads per rank, quiet libraries."""
    env = dict(os.environ)
    if not has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
        # Without this a 2-rank step on 2 cores oversubscribes threads (168 ms vs 34 ms measured).
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // procs))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["DIPNET_MASTER_PORT"] = str(port)
    return env


def train_command(launch, procs: int, port: int, script_args: list[str], module: str = TRAIN_MODULE) -> list[str]:
    py = sys.executable
    if launch.launcher == "deepspeed":
        ds = shutil.which("deepspeed", path=str(Path(py).parent) + os.pathsep + os.environ.get("PATH", ""))
        if ds is None:
            raise UsageError("launch.launcher deepspeed: the 'deepspeed' launcher is not installed (pip install deepspeed)")
        cmd = [ds]
        if launch.hostfile:
            hosts = parse_hostfile(launch.hostfile)
            cmd += ["--hostfile", str(launch.hostfile), "--num_nodes", str(len(hosts))]
            if launch.master_addr:
                cmd += ["--master_addr", launch.master_addr]
        cmd += ["--num_gpus", str(procs), "--master_port", str(port), "--module", module]
        return cmd + script_args
    if launch.launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(port),
                "-m", module] + script_args
    return [py, "-m", module] + script_args


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """deepspeed hostfile lines `host slots=N` (comments and blanks allowed)."""
    hosts = []
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the hostfile ({exc})") from None
    for i, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit() or \
                int(parts[1][6:]) < 1 or not HOST_NAME.fullmatch(parts[0]):
            raise UsageError(f"{path}:{i}: expected 'HOST slots=N' (a plain host name, N >= 1), got {line[:80]!r}")
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise UsageError(f"{path}: no hosts")
    return hosts


def run_ranks(cmd: list[str], env: dict, log_path: Path, timeout_s: float | None, single: bool = False, port: int = 0,
              stop=None, grace_s: float = 30.0, on_poll=None, poll_s: float = 2.0) -> None:
    """Run the launcher; raise RunError with the log's last error line if it fails.

    On a timeout, Ctrl-C/SIGTERM or a preemption of the caller, the ranks are asked to stop:
    `stop()` if given (under Slurm: signal the job's steps, which keeps srun's step alive while
    the ranks save), else SIGTERM to the launcher's process group; whatever is still running
    after `grace_s` is killed. Ranks finish their step and write a checkpoint on SIGTERM.
    `on_poll()`, if given, is called every `poll_s` seconds while the ranks run (live progress).
    `timeout_s` None: no time limit.
    """
    if single:
        env = {**env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + (timeout_s if timeout_s is not None else float("inf"))
            while True:
                try:
                    rc = proc.wait(timeout=max(0.0, min(poll_s, deadline - time.monotonic())))
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        raise
                    if on_poll is not None:
                        on_poll()
        except subprocess.TimeoutExpired:
            _stop(proc, stop, grace_s)
            raise RunError(f"training timed out after {timeout_s:.0f}s (launch.timeout_s, or the Slurm job's time left); "
                           f"log: {log_path}") from None
        except BaseException:  # Ctrl-C / SIGTERM / preemption of dipnet: take every rank down with us
            _stop(proc, stop, grace_s)
            raise
    # The launcher may exit before an orphaned rank does: make sure the group is gone.
    kill_group(proc)
    if rc < 0:
        raise RunError(f"training failed: a rank was killed by signal {-rc} ({signal.Signals(-rc).name}) (log: {log_path})")
    if rc != 0:
        raise RunError(f"training failed (exit {rc}): {last_error_line(log_path)} (log: {log_path})")


def _stop(proc: subprocess.Popen, stop, grace_s: float) -> None:
    if stop is not None:
        stop()
        try:
            proc.wait(timeout=grace_s)  # the ranks save and exit; the launcher follows
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc, grace_s=grace_s)


def kill_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group, SIGKILL whatever is left after `grace_s`.

    Ranks catch SIGTERM, finish their step and save a checkpoint (seconds for small models):
    the grace period lets that save complete; an interrupted save is never used anyway."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies of the group still answer signal 0; look for live members.
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# What launchers print about a rank that failed: never the cause, which a rank printed before.
LAUNCHER_WRAPPERS = ("ChildFailedError", "torch.distributed.elastic", "exits with return code", "SignalException")
EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:?\s*)?[A-Za-z_][\w.]*(?:Error|Exception|Interrupt): \S")


def last_error_line(log_path: Path) -> str:
    """The most telling line of a failed run's log: our own 'error:' line; else the first
    exception a rank raised (the cause: the launcher's ChildFailedError and the other ranks'
    errors come after it); else the launcher's own words."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "dipnet error:" in line:
            return line.split("dipnet error:", 1)[-1].strip()
    for line in lines:
        if EXCEPTION_LINE.match(line.strip()) and not any(w in line for w in LAUNCHER_WRAPPERS):
            return line.strip()[-300:]
    for pat in ("Error:", "error:", "Killed", "exits with return code", "exit status"):
        for line in reversed(lines):
            if pat in line:
                return line.strip()[-300:]
    return lines[-1].strip()[-300:] if lines else "empty log"
