"""The checkpoint format, in one place: save (atomic), find (latest, best), read (checked), load (safe).

A checkpoint is `checkpoints/step-NNNNNN/`: DeepSpeed's own files (only the parameters that train),
`trainer_state.json` (step, world size, recipe, model directory, what trained) and `checksums.json`
(size and SHA-256 of every file). All ranks write into `.tmp-step-NNNNNN/`; rank 0 renames it when
complete and moves the `latest` pointer (and `best`, with train.keep_best). Both stages that read
checkpoints use this module: `train` to resume, `export` to consolidate; neither imports the other.

Resume verifies the checksums (every rank hashes its share of the files): a checkpoint that rotted
on disk (a truncated or bit-flipped shard) is set aside as `.damaged-step-NNNNNN/` and training
resumes from the previous intact one, with one line saying so. Export verifies before it reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from dipnet.pipeline.errors import RunError, UsageError

CKPT_PREFIX = "step-"
CHECKSUMS = "checksums.json"
DAMAGED_PREFIX = ".damaged-"
STATE_KEYS = {"step": int, "tokens_seen": int, "world_size": int, "zero_stage": int, "recipe": dict,
              "model_dir": str, "trainable": list}


@contextlib.contextmanager
def weights_only_torch_load():
    """Force `torch.load(weights_only=True)` inside DeepSpeed's checkpoint utilities.

    They call torch.load(weights_only=False); our checkpoints hold only tensors, plain Python
    data and a few DeepSpeed plain-data classes, which are allow-listed here.
    """
    from dipnet.pipeline.env import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    original = torch.load

    def safe_load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names, if it is complete and inside `ckpt_root`; else the newest
    complete one."""
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        cand = ckpt_root / pointer.read_text(errors="replace").strip()
        if cand.parent == ckpt_root and (cand / "trainer_state.json").is_file():
            return cand
    done = sorted(p for p in ckpt_root.glob(f"{CKPT_PREFIX}*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def latest_intact_checkpoint(ckpt_root: Path, is_main: bool) -> Path | None:
    """The latest complete checkpoint whose files match their checksums (all ranks call this).

    A damaged one is set aside, renamed `.damaged-step-NNNNNN` (kept for inspection, never
    deleted), with one line saying why, and the one before it is tried. Never loads garbage: with
    no intact checkpoint left, training starts over from step 0 and says so."""
    set_aside = False
    while (ck := latest_checkpoint(ckpt_root)) is not None:
        problem = checkpoint_problem(ck)
        if problem is None:
            break
        if is_main:
            aside = ckpt_root / f"{DAMAGED_PREFIX}{ck.name}"
            n = 1
            while aside.exists():
                aside, n = ckpt_root / f"{DAMAGED_PREFIX}{ck.name}.{n}", n + 1
            try:
                os.replace(ck, aside)
            except OSError as exc:
                raise RunError(f"checkpoint {ck} is damaged ({problem}) and cannot be set aside: "
                               f"{exc.strerror or exc}") from None
            print(f"checkpoint {ck.name} is damaged ({problem}): set aside as {aside.name}", flush=True)
        set_aside = True
        if _dist()[1] > 1:
            torch.distributed.barrier()
    if set_aside and is_main:
        print(f"resuming from {ck.name}, the latest intact checkpoint" if ck is not None
              else f"no intact checkpoint left in {ckpt_root}: training starts over from step 0", flush=True)
    return ck


def best_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `best` names (train.keep_best: the lowest validation NLL), if complete."""
    pointer = ckpt_root / "best"
    if pointer.is_file():
        cand = ckpt_root / pointer.read_text(errors="replace").strip()
        if cand.parent == ckpt_root and (cand / "trainer_state.json").is_file():
            return cand
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (step-N) from itself, its `checkpoints/` parent or the train dir: the
    best one where train.keep_best marked one, else the latest."""
    p = Path(path)
    if (p / "trainer_state.json").is_file():
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir():
            ck = best_checkpoint(root) or latest_checkpoint(root)
            if ck is not None:
                return ck
    raise UsageError(f"{p}: no complete checkpoint (expected a step-N directory with trainer_state.json)")


def read_trainer_state(ckpt: Path) -> dict:
    """trainer_state.json, checked key by key (one line naming the key on any problem)."""
    from pydantic import ValidationError

    from dipnet.pipeline.readers import read_json_object
    from dipnet.pipeline.recipe import Recipe, format_validation_error

    path = ckpt / "trainer_state.json"
    state = read_json_object(path)
    for key, typ in STATE_KEYS.items():
        if key not in state:
            hint = " (written by an older dipnet: retrain)" if key == "trainable" else ""
            raise UsageError(f"{path}: no '{key}'{hint}")
        if not isinstance(state[key], typ) or isinstance(state[key], bool):
            raise UsageError(f"{path}: '{key}' must be {typ.__name__}, got {type(state[key]).__name__}")
    if state["step"] < 0 or state["world_size"] < 1 or state["zero_stage"] not in (0, 1, 2, 3):
        raise UsageError(f"{path}: 'step', 'world_size' or 'zero_stage' out of range")
    if not all(isinstance(n, str) for n in state["trainable"]):
        raise UsageError(f"{path}: 'trainable' must list parameter names")
    try:
        state["recipe_obj"] = Recipe.model_validate(state["recipe"])
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc, f"{path} (recipe)")) from None
    if not (ckpt / ckpt.name).is_dir():
        raise UsageError(f"{ckpt}: no DeepSpeed checkpoint directory '{ckpt.name}' inside")
    return state


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _dist() -> tuple[int, int]:
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


def _gather(local):
    """Every rank's `local`, on every rank (itself alone without a process group)."""
    rank, world = _dist()
    if world == 1:
        return [local]
    out = [None] * world
    torch.distributed.all_gather_object(out, local)
    return out


def _checkpoint_files(ckpt: Path) -> list[str]:
    """The files a checkpoint was saved with, relative to it (the universal form added later is not)."""
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS and p.relative_to(ckpt).parts[0] != "universal")


def write_checksums(ckpt: Path, is_main: bool) -> None:
    """checksums.json: size and SHA-256 of every file; the ranks hash a share of the files each
    (a 7B full fine-tune's optimizer state is ~100 GB: one rank alone would take minutes)."""
    rank, world = _dist()
    files = _gather(_checkpoint_files(ckpt) if is_main else None)[0]  # rank 0's listing, for all
    mine = {f: {"bytes": (ckpt / f).stat().st_size, "sha256": _sha256(ckpt / f)} for f in files[rank::world]}
    merged = {k: v for part in _gather(mine) for k, v in part.items()}
    if is_main:
        tmp = ckpt / f"{CHECKSUMS}.tmp"
        tmp.write_text(json.dumps({"files": merged}, indent=1, sort_keys=True))
        os.replace(tmp, ckpt / CHECKSUMS)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be trusted (a file missing, of the wrong size, or with another SHA-256),
    or None when every file matches checksums.json. Sizes are checked first, then the ranks hash
    a share each; every rank gets the same answer. A checkpoint without checksums.json (written by
    an older dipnet) is not verified."""
    rank, world = _dist()
    path = ckpt / CHECKSUMS
    if not path.is_file():
        return None
    from dipnet.pipeline.readers import read_json_object

    try:  # checksums.json can rot too: then the checkpoint counts as damaged (every rank reads it)
        files = read_json_object(path).get("files")
    except UsageError as exc:
        return str(exc)
    if not isinstance(files, dict) or not files:
        return f"{path}: expected a non-empty 'files' object"
    names = sorted(files)
    problem = None
    for i, name in enumerate(names):
        entry, f = files[name], ckpt / name
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            problem = f"{path}: malformed entry for '{name}'"
        elif Path(name).is_absolute() or ".." in Path(name).parts:
            problem = f"{path}: names '{name}', outside the checkpoint"
        elif not f.is_file():
            problem = f"{name} is missing"
        elif f.stat().st_size != entry["bytes"]:
            problem = f"{name} has {f.stat().st_size} bytes, {entry['bytes']} were saved (truncated?)"
        elif i % world == rank and _sha256(f) != entry["sha256"]:
            problem = f"{name} has another SHA-256 than was saved (its bytes changed)"
        if problem:
            break
    found = [p for p in _gather(problem) if p]
    return found[0] if found else None


def save_failed(exc: Exception, tmp: Path, ckpt_root: Path) -> Exception:
    """The one-line error for a checkpoint write that failed, after removing the partial write
    (ours, and on a full disk the space the next attempt needs). torch.save reports a full disk
    as a RuntimeError ("file write failed"), not an OSError: the free space tells."""
    import errno

    shutil.rmtree(tmp, ignore_errors=True)
    try:
        full = shutil.disk_usage(ckpt_root).free < 16 * 2**20
    except OSError:
        full = False
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or full:
        reason = "no space left on device (free space there, or point run.output_dir at a larger disk)"
    elif isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:
        return exc
    return RunError(f"cannot write checkpoint {tmp}: {reason}; the latest complete checkpoint is still "
                    f"{latest_checkpoint(ckpt_root)}")


def save_checkpoint(engine, ckpt_root: Path, step: int, state: dict, keep_last: int, is_main: bool) -> Path:
    """All ranks write into a temporary directory; rank 0 renames it when complete, then moves
    the `latest` pointer. A checkpoint interrupted mid-write keeps its `.tmp-` name and is never
    chosen by `latest_checkpoint`."""
    name = f"{CKPT_PREFIX}{step:06d}"
    tmp, final = ckpt_root / f".tmp-{name}", ckpt_root / name
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    try:
        engine.save_checkpoint(str(tmp), tag=name, exclude_frozen_parameters=True)
        torch.distributed.barrier()
        if is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        torch.distributed.barrier()
        write_checksums(tmp, is_main)
    except Exception as exc:
        raise save_failed(exc, tmp, ckpt_root) from None
    if is_main:
        try:
            slow = os.environ.get("DIPNET_FAULT_SLOW_SAVE", "")  # fault injection (tests): "STEP:SECONDS"
            if slow.split(":")[0] == str(step):
                time.sleep(float(slow.split(":")[1]))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            ptr = ckpt_root / "latest.tmp"
            ptr.write_text(name)
            os.replace(ptr, ckpt_root / "latest")
        except OSError as exc:
            raise RunError(f"cannot write checkpoint {tmp}: {exc.strerror or exc}") from None
        done = sorted(p for p in ckpt_root.glob(f"{CKPT_PREFIX}*") if (p / "trainer_state.json").is_file())
        best = (ckpt_root / "best").read_text().strip() if (ckpt_root / "best").is_file() else None
        for old in done[:-keep_last]:
            if old.name != best:  # train.keep_best: the lowest validation NLL stays
                shutil.rmtree(old, ignore_errors=True)
    torch.distributed.barrier()
    return final


def to_universal(ckpt: Path, is_main: bool) -> Path:
    """DeepSpeed's universal form of `ckpt` (written once by rank 0 into ckpt/universal/).

    The other ranks wait for it on the shared file system, not in a collective: converting a 7B
    full fine-tune (~100 GB of optimizer state) can outlast the process group's timeout (30 min),
    which would kill the waiting ranks. Their wait has its own budget, sized to the checkpoint."""
    uni = ckpt / "universal"
    done = uni / ".complete"
    failed = ckpt / "universal.failed"
    converting = not done.is_file()
    if is_main and converting:
        failed.unlink(missing_ok=True)  # a previous attempt's: removed before anyone looks for it
    torch.distributed.barrier()
    if not converting:
        return uni
    if is_main:
        from argparse import Namespace

        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(uni, ignore_errors=True)
        args = Namespace(input_folder=str(ckpt / ckpt.name), output_folder=str(uni / ckpt.name), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        try:
            with weights_only_torch_load():  # the converter unpickles freely otherwise
                ds_to_universal.main(args)
        except Exception as exc:
            msg = (f"cannot convert {ckpt} to a universal checkpoint for another world size "
                   f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
            failed.write_text(msg)
            raise RunError(msg) from None
        done.write_text("ok")
    else:
        wait_for_conversion(done, failed, conversion_budget_s(ckpt))
    torch.distributed.barrier()
    return uni


def conversion_budget_s(ckpt: Path) -> float:
    """How long the other ranks wait for rank 0's universal conversion: 10 min plus 1 min per GiB
    of checkpoint (the converter reads and rewrites every byte of it once)."""
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    return 600 + 60 * size / 2**30


def wait_for_conversion(done: Path, failed: Path, budget_s: float, poll_s: float = 1.0) -> None:
    deadline = time.monotonic() + budget_s
    while not done.is_file():
        if failed.is_file():
            raise RunError(f"rank 0 failed: {failed.read_text()[:300]}")
        if time.monotonic() > deadline:
            raise RunError(f"{done.parent}: rank 0's universal conversion did not finish in {budget_s:.0f} s")
        time.sleep(poll_s)
