"""Where dipnet writes, and the only things it ever deletes.

Every directory dipnet produces (a model from `base`, `convert` or `export`, an evaluation, a
run directory) carries a marker file, `.dipnet.json`, saying what wrote it. dipnet replaces or
deletes an existing directory only if it carries the marker (an empty directory is also fine):

    with output_dir(out, kind="export", inputs=[checkpoint]) as tmp:
        ...  # write everything into tmp and verify it there
    # success: tmp replaces out (the old out is removed only after the swap);
    # any failure: tmp is removed and out is untouched

The output may not be, contain, or sit inside any of the inputs (`export DIR --out DIR` would
otherwise replace the checkpoints it reads). Temporary directories are `<out>.tmp-<pid>` next
to the output; the ones a dead process left behind (kill -9, a power cut) are removed the next
time the same output is written, and only if they carry our marker and name this host.

`check_name` is the one rule for every name that becomes a path component or a job name
(run names, variants): letters, digits, `.`, `_`, `-`, starting with a letter or digit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

from dipnet.pipeline.errors import UsageError

MARKER = ".dipnet.json"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"


def check_name(value: str, what: str) -> str:
    """`value` if it is a safe name; UsageError naming `what` otherwise."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise UsageError(f"{what}: {value!r} is not a valid name (expected {NAME_RULE})")
    return value


def is_ours(path: Path) -> bool:
    """Whether `path` is a directory dipnet wrote (it carries our marker)."""
    m = Path(path) / MARKER
    try:
        data = json.loads(m.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("writer") == "dipnet"


def write_marker(d: Path, kind: str, **extra) -> None:
    (Path(d) / MARKER).write_text(json.dumps({"writer": "dipnet", "kind": kind, "host": socket.gethostname(),
                                              "pid": os.getpid(), "created": time.time(), **extra}))


def _is_empty_dir(p: Path) -> bool:
    try:
        return p.is_dir() and not any(p.iterdir())
    except OSError:
        return False


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_target(out: str | Path, inputs: Iterable[str | Path] = (), flag: str = "--out") -> Path:
    """Refuse an output that is not ours, or that overlaps an input. Returns the resolved path."""
    out = Path(out).expanduser()
    if out.is_symlink():
        raise UsageError(f"{flag} {out}: is a symbolic link; give a plain directory")
    res = out.resolve()
    resolved = [(i, Path(i).expanduser().resolve()) for i in inputs]
    for i, inp in resolved:
        if _inside(res, inp):
            raise UsageError(f"{flag} {out}: is the input {i} or inside it; write the output somewhere else")
    for i, inp in resolved:
        if _inside(inp, res):
            raise UsageError(f"{flag} {out}: contains the input {i}; write the output somewhere else")
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"{flag} {out}: exists and is not a directory; dipnet will not replace it")
        if not (is_ours(out) or _is_empty_dir(out)):
            raise UsageError(f"{flag} {out}: exists and was not written by dipnet (no {MARKER}); "
                             "dipnet replaces only its own outputs: remove it yourself or choose another path")
    return res


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def clean_stale(out: Path) -> list[Path]:
    """Remove `<out>.tmp-<pid>` / `<out>.old-<pid>` left by dead processes on this host."""
    removed = []
    out = Path(out)
    if not out.parent.is_dir():
        return removed
    host = socket.gethostname()
    for p in list(out.parent.glob(f"{glob_escape(out.name)}.tmp-*")) + list(out.parent.glob(f"{glob_escape(out.name)}.old-*")):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)) or p.is_symlink():
            continue
        try:
            marker = json.loads((p / MARKER).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # not ours (or not readable): never deleted
        if marker.get("writer") == "dipnet" and marker.get("host") == host:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def commit(tmp: Path, out: Path) -> None:
    """Swap the finished `tmp` in for `out` (which, if present, is ours: checked before)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def output_dir(out: str | Path, kind: str, inputs: Iterable[str | Path] = (), flag: str = "--out", **marker):
    """Build a directory under a temporary name; swap it in for `out` only if the block succeeds."""
    out = Path(out).expanduser()
    check_output_target(out, inputs, flag)
    out = out.absolute()
    clean_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists() or tmp.is_symlink():
        if tmp.is_symlink() or not is_ours(tmp):
            raise UsageError(f"{tmp}: exists and was not written by dipnet; remove it yourself")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_marker(tmp, kind, **marker)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(tmp, out)


def built_once(out: Path, done, build) -> None:
    """Run `build()` unless `done()`, holding an exclusive lock on the cache entry `out` while
    checking again and building.

    Two processes that want the same cache entry (two runs started together, the test suite's
    workers) would otherwise both build it, and the second would replace the first's finished
    directory. The lock is a file beside the entry, `.<name>.lock`, held with flock: released by
    the kernel if the holder dies, so a killed build never blocks the next one.
    """
    import fcntl

    if done():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if not done():  # another process may have built it while this one waited
                build()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def assert_inside(path: str | Path, root: str | Path, what: str) -> Path:
    """`path` resolved, if it lies inside `root`; a UsageError naming `what` otherwise."""
    p, r = Path(path).resolve(), Path(root).resolve()
    if not _inside(p, r):
        raise UsageError(f"{what}: {path} is outside {root}")
    return p


def claim_run_dir(run_dir: Path) -> None:
    """Create the run directory, or accept an existing one only if dipnet made it."""
    if run_dir.is_symlink():
        raise UsageError(f"run directory {run_dir}: is a symbolic link; give a plain directory")
    if run_dir.exists():
        if not run_dir.is_dir():
            raise UsageError(f"run directory {run_dir}: exists and is not a directory")
        if any(run_dir.iterdir()) and not is_ours(run_dir):
            raise UsageError(f"run directory {run_dir}: exists and was not written by dipnet (no {MARKER}); "
                             "choose another run.name or run.output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / MARKER).is_file():
        write_marker(run_dir, "run")
