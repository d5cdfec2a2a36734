"""`dipnet run RECIPE`: the staged pipeline in one run directory.

    runs/<name>/
      recipe.yaml        the resolved recipe (every default filled in)
      manifest.json      per stage: status, start/end, input hash, outputs, error
      .lock              held while a run writes here (a second run is refused with our PID)
      base/ convert/ preprocess/ train/<variant>-s<seed>/ export/<variant>-s<seed>/ eval/<model>/
      report.md report.json report/*.png

Stages run in order: base -> convert -> preprocess -> train -> export -> eval -> report.
A stage whose input hash (the recipe sections it reads + its upstream outputs) matches a
completed entry is skipped; `--from STAGE` re-runs from there, `--only STAGE` runs one.
Stage outputs are written under temporary names and renamed when complete, so an interrupted
stage is simply re-run; training resumes from its latest complete checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import yaml

from dipnet.pipeline.errors import DipnetError, RunError, UsageError
from dipnet.pipeline.outputs import assert_inside, claim_run_dir, output_dir
from dipnet.pipeline.recipe import CONTROL_METHODS as CONTROLS, Recipe, expand_runs

STAGES = ("base", "convert", "preprocess", "train", "export", "eval", "report")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _read_key(path: Path):
    d = _read_json(path)
    return d.get("key") if isinstance(d, dict) else None


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- lock + manifest

@contextmanager
def run_lock(run_dir: Path):
    """Exclusive ownership of a run directory while a run writes it; a second run is refused
    with the holder's host and PID.

    An flock on run_dir/.lock (released by the OS if we die). File systems without lock
    support (Lustre without -o flock, NFS without lockd) refuse flock; there, or with
    DIPNET_LOCK=file, an atomically created run_dir/.lock.held records host, PID and a heartbeat
    refreshed every 30 s: a lock whose process is gone (same host) or whose heartbeat is older than
    5 minutes (another host) is stale and taken over.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if os.environ.get("DIPNET_LOCK") != "file":
        path = run_dir / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"{run_dir}: another dipnet run (PID {other}) is writing this run directory") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        else:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
    with _file_lock(run_dir / ".lock.held"):
        yield


STALE_HEARTBEAT_S = 300


@contextmanager
def _file_lock(path: Path):
    import socket
    import threading

    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                age = time.time() - path.stat().st_mtime
            except (OSError, ValueError):
                holder, age = {}, 0.0
            same_host = holder.get("host") == me["host"]
            dead = same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])
            if not (dead or (not same_host and age > STALE_HEARTBEAT_S)):
                raise UsageError(f"{path.parent}: another dipnet run (PID {holder.get('pid', '?')} on "
                                 f"{holder.get('host', '?')}) is writing this run directory") from None
            path.unlink(missing_ok=True)  # stale: its holder is gone
    else:
        raise UsageError(f"{path.parent}: could not take the run lock {path}")
    os.write(fd, json.dumps(me).encode())
    os.close(fd)
    stop = threading.Event()

    def beat():
        while not stop.wait(30):
            try:
                os.utime(path)
            except OSError:
                return

    threading.Thread(target=beat, daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    from dipnet.pipeline.outputs import _pid_alive as alive

    return alive(pid)


def refuse_unusable_gpus(device: str, cuda: bool) -> None:
    """launch.device auto on a machine whose GPUs torch cannot use (a driver older than the CUDA
    build needs, a CPU build of torch): one line, never a silent training run on the CPU."""
    from dipnet.pipeline.env import gpus_listed

    if device != "auto" or cuda:
        return
    n = gpus_listed()
    if n:
        import torch

        raise UsageError(f"nvidia-smi lists {n} GPU(s) that torch {torch.__version__} (CUDA build "
                         f"{torch.version.cuda or 'none'}) cannot use: fix the driver or the install "
                         "(make install EXTRA=gpu; `dipnet env` shows both), or set launch.device: cpu to train on "
                         "the CPU on purpose")


class Manifest:
    def __init__(self, run_dir: Path):
        from dipnet.pipeline.readers import read_json_object

        self.path = run_dir / "manifest.json"
        self.data = read_json_object(self.path) if self.path.is_file() else {"stages": {}}
        if not isinstance(self.data.get("stages"), dict) or not all(isinstance(v, dict) for v in self.data["stages"].values()):
            raise UsageError(f"{self.path}: expected {{'stages': {{stage: {{...}}}}}}")

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def entry(self, stage: str) -> dict:
        return self.data["stages"].get(stage, {})

    def is_complete(self, stage: str, inputs: str) -> bool:
        e = self.entry(stage)
        return e.get("status") == "completed" and e.get("inputs_hash") == inputs

    def start(self, stage: str, inputs: str) -> None:
        self.data["stages"][stage] = {"status": "running", "started": _now(), "inputs_hash": inputs, "pid": os.getpid()}
        self.save()

    def finish(self, stage: str, status: str, outputs: dict | None = None, error: str | None = None) -> None:
        e = self.data["stages"].setdefault(stage, {})
        e.update(status=status, ended=_now())
        if outputs is not None:
            e["outputs"] = outputs
            e["outputs_hash"] = _hash(outputs)
        if error:
            e["error"] = error
        else:
            e.pop("error", None)
        self.save()

    def outputs(self, stage: str) -> dict:
        e = self.entry(stage)
        if e.get("status") != "completed":
            raise UsageError(f"stage '{stage}' has not completed in {self.path.parent}; run it first "
                             f"(dipnet run RECIPE --from {stage})")
        if not isinstance(e.get("outputs"), dict):
            raise UsageError(f"{self.path}: stage '{stage}' has no outputs recorded")
        return e["outputs"]


# ----------------------------------------------------------------------------- the stages

class Run:
    """One pipeline run: the recipe, its directory and manifest, and one method per stage."""

    def __init__(self, recipe: Recipe, *, progress: bool = True):
        self.recipe = recipe
        self.dir = recipe.output_dir.resolve()
        self.manifest = Manifest(self.dir)
        self.progress = progress
        self.runs = expand_runs(recipe)
        self._announced: set[str] = set()  # runs whose "trained" line was printed

    def say(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)

    # Each stage returns its outputs (recorded in the manifest, hashed into downstream inputs).
    def stage_inputs(self, stage: str) -> str:
        r = self.recipe
        up = lambda s: self.manifest.entry(s).get("outputs_hash")  # noqa: E731
        parts = {
            "base": (r.section_hash("model"), r.run.seed, sorted(r.eval.tasks), r.eval.gsm8k_path),
            "convert": (up("base"), r.section_hash("dip"), r.model.trust_remote_code),
            "preprocess": (up("base"), r.section_hash("data")),
            "train": (up("convert"), up("preprocess"), r.section_hash("train", "dip", "run", "study"),
                      _hash(r.to_dict()["variants"]), r.seeds),
            "export": (up("train"), r.section_hash("export")),
            "eval": (up("export"), up("base"), r.section_hash("eval", "data")),
            "report": (up("eval"), up("train"), r.section_hash("report", "study")),
        }[stage]
        return _hash(parts)

    def stage_base(self) -> dict:
        from dipnet.pipeline.base_model import tiny_base

        from dipnet.pipeline.pretrained import is_gguf_spec, pretrained_base

        model = self.recipe.model
        if model.base == "tiny":
            self.say("  building (or reusing) the embedded tiny base")
            path = tiny_base(model.tiny, seed=self.recipe.run.seed, progress=self.progress)
            meta = json.loads((path / "pretrain.json").read_text())
        elif is_gguf_spec(model.base):
            self.say(f"  importing (or reusing) {model.base}")
            path = pretrained_base(model.base, dtype=model.dtype, progress=self.progress)
            meta = json.loads((path / "import.json").read_text())
        else:
            from dipnet.pipeline.models import check_model_dir

            path = Path(model.base).expanduser()
            if not path.is_dir():
                path = download_model(model.base)
            check_model_dir(path, model.trust_remote_code)
            meta = {}
        from dipnet.eval.evaluate import model_fingerprint
        from dipnet.launch.slurm import in_slurm_job

        link = self.dir / "base" / "model"
        link.parent.mkdir(parents=True, exist_ok=True)
        if in_slurm_job():
            # Compute nodes may see neither the hub nor this user's cache: the model itself goes
            # into the run directory (hard links where the file system allows, else a copy).
            from dipnet.pipeline.outputs import output_dir

            if not (link.is_dir() and not link.is_symlink() and (link / "config.json").is_file()
                    and model_fingerprint(link) == model_fingerprint(path)):
                if link.is_symlink():
                    link.unlink()
                with output_dir(link, "model", inputs=[path], flag="base model copy") as tmp:
                    _link_or_copy_tree(path, tmp)
            path = link
        else:
            # base/model points at the model used (the tiny base lives in the user's cache, shared by runs).
            if link.exists() and not link.is_symlink():
                from dipnet.pipeline.outputs import is_ours

                if not is_ours(link):
                    raise UsageError(f"{link}: exists and is not the link dipnet makes; remove it")
                shutil.rmtree(link)  # a copy staged by an earlier Slurm job: a link now
            tmp = link.with_name(f"model.tmp-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(path.resolve(), target_is_directory=True)
            os.replace(tmp, link)
        self.stage_eval_data()
        return {"model_dir": str(path.resolve()), "fingerprint": model_fingerprint(path), "pretrain": meta}

    def stage_eval_data(self) -> None:
        """GSM8K, from the local copy or the hub, into run_dir/data/gsm8k: evaluation jobs read
        only the run directory (and a hub dataset is fetched once, by the first job)."""
        e = self.recipe.eval
        if not any(t.startswith("gsm8k") for t in e.tasks):
            return
        from dipnet.eval.tasks import load_gsm8k
        from dipnet.pipeline.outputs import output_dir

        train, test = load_gsm8k(e.gsm8k_path)
        with output_dir(self.dir / "data" / "gsm8k", "data", flag="staged eval data") as tmp:
            for name, rows in (("train", train), ("test", test)):
                (tmp / f"{name}.jsonl").write_text("".join(
                    json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
        self.say(f"  staged GSM8K for evaluation ({len(train)} train, {len(test)} test) in {self.dir / 'data' / 'gsm8k'}")

    def eval_gsm8k_path(self) -> str | None:
        staged = self.dir / "data" / "gsm8k"
        return str(staged) if (staged / "test.jsonl").is_file() else self.recipe.eval.gsm8k_path

    def base_dir(self) -> str:
        """The base model directory the base stage recorded; it must be the one the recipe names
        (a manifest is a file in the run directory, not a source of paths to load)."""
        recorded = self.manifest.outputs("base").get("model_dir")
        staged = self.dir / "base" / "model"
        if isinstance(recorded, str) and staged.is_dir() and not staged.is_symlink() and \
                Path(recorded).resolve() == staged.resolve():
            return recorded  # the copy a Slurm job staged into the run directory
        expected = self.expected_base()
        if expected is not None and (not isinstance(recorded, str) or Path(recorded).resolve() != expected.resolve()):
            raise UsageError(f"{self.manifest.path}: base model_dir {recorded!r} is not the model the recipe names "
                             f"({expected}); rerun with --from base")
        return str(recorded)

    def expected_base(self) -> Path | None:
        from dipnet.pipeline.base_model import cache_root, settings_hash
        from dipnet.pipeline.pretrained import is_gguf_spec, pretrained_dir

        base = self.recipe.model.base
        if base == "tiny":
            return cache_root() / "base" / settings_hash(self.recipe.model.tiny, self.recipe.run.seed)
        if is_gguf_spec(base):
            return pretrained_dir(base, self.recipe.model.dtype)
        p = Path(base).expanduser()
        return p if p.is_dir() else None  # a hub id resolves to a cache path only at download time

    def inside(self, path, what: str) -> str:
        if not isinstance(path, str):
            raise UsageError(f"{self.manifest.path}: {what} is not a path")
        return str(assert_inside(path, self.dir, f"{self.manifest.path}: {what}"))

    def stage_convert(self) -> dict:
        from dipnet.pipeline.convert import convert
        from dipnet.pipeline.dip import DipConfig

        base = self.base_dir()
        out = self.dir / "convert" / "model"
        summary = convert(base, out, DipConfig.from_settings(self.recipe.dip),
                          trust_remote_code=self.recipe.model.trust_remote_code)
        self.say(f"  converted {summary['family']} with {summary['projections']} projections ({summary['method']})")
        return {"model_dir": str(out), **summary}

    def stage_preprocess(self) -> dict:
        from dipnet.pipeline.data import preprocess

        base = self.base_dir()
        meta = preprocess(self.recipe.data, base, self.dir / "preprocess", trust_remote_code=self.recipe.model.trust_remote_code)
        if meta["truncated"]:
            self.say(f"  {meta['truncated']} examples truncated to data.max_length={self.recipe.data.max_length}")
        self.say(f"  {meta['examples']} training sequences, {meta['tokens']} tokens")
        if len(meta.get("mixture", [])) > 1:
            self.say("  mixture: " + ", ".join(f"{m['source']} {m['share']:.1%} ({m['examples']} of {m['rows']} rows)"
                                               for m in meta["mixture"]))
        return meta

    def stage_train(self) -> dict:
        """Train every (variant, seed). Pending runs share one launch (start-up paid once);
        with study.match=time the baseline runs first and sets the others' time budget."""
        model_dir = self.inside(self.manifest.outputs("convert").get("model_dir"), "convert model_dir")
        data = dict(self.manifest.outputs("preprocess"))
        data["path"] = self.inside(data.get("path"), "preprocess path")
        out, pending, keys = {}, [], {}
        # A control (dip_matched, dip_shuffled) replays a dip run's final λ: its key includes that
        # run's, and it trains after it (below). Sources come before their controls in this order.
        for variant, seed, r in sorted(self.runs, key=lambda run: run[2].dip.method in CONTROLS):
            run_id = f"{variant}-s{seed}"
            r = self.matched(r, variant)
            d = self.dir / "train" / run_id
            key = keys[run_id] = _hash([r.section_hash("train", "dip", "run", "data", "model"), model_dir, data["key"],
                                        self.control_key(r, seed, keys) if r.dip.method in CONTROLS else None])
            inputs = d / "inputs.json"
            if inputs.is_file() and _read_key(inputs) != key:
                assert_inside(d, self.dir / "train", "train directory")
                shutil.rmtree(d)  # settings changed: these checkpoints belong to another run
            if (d / "train_summary.json").is_file():
                self.say(f"  {run_id}: done (skipped)")
                out[run_id] = self._train_outputs(d, variant, seed, key)
                continue
            d.mkdir(parents=True, exist_ok=True)
            write_json_atomic(inputs, {"key": key})
            (d / "recipe.json").write_text(json.dumps(r.to_dict(), indent=2))
            pending.append((run_id, variant, seed, r, d, key))
        if pending:  # before any rank starts: a tracker that is missing or away fails here, in one line
            from dipnet.pipeline.trackers import check_trackers

            for report_to in {tuple(p[3].train.report_to) for p in pending}:
                check_trackers(list(report_to))
        if not pending:
            return out
        first = [p for p in pending if p[3].dip.method not in CONTROLS]
        self._launch_runs(first, model_dir, data)
        controls = [p for p in pending if p[3].dip.method in CONTROLS]
        for run_id, variant, seed, r, d, key in controls:
            self.write_control_lambda(r, seed, d)
        self._launch_runs(controls, model_dir, data)
        for run_id, variant, seed, r, d, key in pending:
            if not (d / "train_summary.json").is_file():
                raise RunError(f"training of {run_id} did not finish (see {self.dir / 'train' / 'train.log'})")
            self._say_trained(run_id, d)
            out[run_id] = self._train_outputs(d, variant, seed, key)
        return out

    def control_source(self, r: Recipe, seed: int) -> tuple[Path, str | None]:
        """Where a control's source λ are: (the file, the source's run id when it is a variant of
        this recipe, trained here at the same seed; None for a model directory holding dip/)."""
        from dipnet.pipeline.dip import DIP_SUBDIR, DIP_WEIGHTS
        from dipnet.pipeline.train import LAMBDA_FILE

        source = r.dip.source
        if source in (self.recipe.variants or {}):
            method = next(rr.dip.method for v, s, rr in self.runs if v == source and s == seed)
            if method != "dip":
                raise UsageError(f"dip.source '{source}': a control replays a dip run; variant '{source}' has "
                                 f"dip.method {method}")
            return self.dir / "train" / f"{source}-s{seed}" / LAMBDA_FILE, f"{source}-s{seed}"
        path = Path(source).expanduser() / DIP_SUBDIR / DIP_WEIGHTS
        if not path.is_file():
            raise UsageError(f"dip.source '{source}': neither a variant of this recipe nor a model directory with "
                             f"{DIP_SUBDIR}/{DIP_WEIGHTS}")
        return path, None

    def control_key(self, r: Recipe, seed: int, keys: dict) -> str:
        path, run_id = self.control_source(r, seed)
        return keys[run_id] if run_id else hashlib.sha256(path.read_bytes()).hexdigest()

    def write_control_lambda(self, r: Recipe, seed: int, d: Path) -> None:
        """The control's λ (dip_matched: each projection's mean; dip_shuffled: permuted) from its
        source's final λ, into the run's directory, where train.py reads it."""
        from dipnet.pipeline.dip import control_state, read_log_variances, write_log_variances
        from dipnet.pipeline.train import LAMBDA_INIT_FILE

        path, run_id = self.control_source(r, seed)
        if run_id and not path.is_file():
            raise RunError(f"dip.source '{r.dip.source}': {path} is missing (a run trained before dipnet recorded "
                           "final λ: retrain it)")
        write_log_variances(d / LAMBDA_INIT_FILE, control_state(r.dip.method, read_log_variances(path), seed))

    def _launch_runs(self, pending: list, model_dir: str, data: dict) -> None:
        """One launch for `pending`; with study.match=time the baseline first, whose wall time is
        then every other run's budget (one launch each)."""
        if not pending:
            return
        if self.recipe.study.match == "time":
            base = [p for p in pending if p[1] == self.recipe.report.baseline]
            rest = [p for p in pending if p[1] != self.recipe.report.baseline]
            self._launch(base, model_dir, data, None)
            budget = None
            for run_id, variant, seed, *_ in self.runs_of(self.recipe.report.baseline):
                summary = self.dir / "train" / f"{variant}-s{seed}" / "train_summary.json"
                if summary.is_file():
                    budget = json.loads(summary.read_text())["wall_s"]
            for p in rest:  # one launch each: the budget is wall-clock of the training loop
                self._launch([p], model_dir, data, budget)
        else:
            self._launch(pending, model_dir, data, None)

    def _say_trained(self, run_id: str, d: Path) -> None:
        """One console line per finished run, printed once (live while the launch goes on)."""
        if run_id in self._announced:
            return
        self._announced.add(run_id)
        s = json.loads((d / "train_summary.json").read_text())
        num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731 (the file may be garbled)
        last = s.get("last") if isinstance(s, dict) and isinstance(s.get("last"), dict) else {}
        steps, wall, loss = (s.get("steps"), s.get("wall_s"), last.get("loss")) if isinstance(s, dict) else (None,) * 3
        self.say(f"  {run_id}: trained {steps if num(steps) else '?'} steps"
                 + (f" in {wall:.0f}s" if num(wall) else "") + (f", final loss {loss:.4f}" if num(loss) else ""))

    def runs_of(self, variant: str):
        return [(f"{v}-s{s}", v, s, r) for v, s, r in self.runs if v == variant]

    def _launch(self, batch: list, model_dir: str, data: dict, budget_s: float | None) -> None:
        from dipnet.launch import local as launch, slurm

        if not batch:
            return
        r = batch[0][3]  # launch settings are shared by the study's runs
        spec = self.dir / "train" / f"launch-{batch[0][0]}.json"
        spec.write_text(json.dumps([{"recipe": str(d / "recipe.json"), "out": str(d)} for *_, d, _ in batch], indent=2))
        args = ["--runs", str(spec), "--model", model_dir, "--data", data["path"]]
        if budget_s:
            args += ["--max-seconds", f"{budget_s:.2f}"]
        single = r.launch.launcher == "single"
        timeout, stop = r.launch.timeout_s, None
        if slurm.in_slurm_job():  # inside `dipnet launch --slurm`'s train job: ranks on every node
            procs, single = int(os.environ["DIPNET_PROCS_PER_NODE"]), False
            port = int(os.environ["MASTER_PORT"])
            cmd = slurm.slurm_train_command(args, procs)
            how = f"slurm {os.environ['DIPNET_SLURM_LAUNCHER']} {os.environ.get('SLURM_NNODES', '1')} node(s) x{procs}"
            # The job's own limit governs (USR1 arrives before it, and the run saves and requeues).
            timeout = slurm.job_seconds_left() or timeout
            stop = slurm.signal_job_steps
        else:
            refuse_unusable_gpus(r.launch.device, launch.has_cuda())
            procs = 1 if single else (r.launch.procs_per_node or launch.default_procs_per_node())
            port = launch.choose_master_port(r.launch.master_port)
            cmd = launch.train_command(r.launch, procs, port, args)
            how = f"{r.launch.launcher} x{procs} ranks"
        from dipnet.pipeline.models import check_attn_implementation

        for b in batch:  # before any rank starts: a kernel this machine lacks is one line, not 8 tracebacks
            check_attn_implementation(b[3].model.attn_implementation, launch.has_cuda())
        if any(b[3].train.precision == "bf16" for b in batch) and r.launch.device != "cuda" and not launch.has_cuda():
            from dipnet.pipeline.env import cpu_has_native_bf16

            if not cpu_has_native_bf16():
                self.say("  note: train.precision bf16 on a CPU without AVX512-BF16/AMX: bf16 matmuls run at about a "
                         "ninth of the fp32 rate here (bench/limits.py); fp32 trains faster on this machine")
        log = self.dir / "train" / "train.log"
        names = ", ".join(b[0] for b in batch)
        self.say(f"  {names}: {how}, ZeRO-{r.train.zero_stage} (log: {log})")
        t0 = time.time()

        def announce_finished_runs():  # the ranks write train_summary.json as each run ends
            for run_id, *_, d, _ in batch:
                if (d / "train_summary.json").is_file():
                    try:
                        self._say_trained(run_id, d)
                    except (OSError, ValueError, KeyError, TypeError):
                        self._announced.discard(run_id)  # half-written: read it again at the next poll

        launch.run_ranks(cmd, launch.rank_env(procs, port), log, timeout, single=single, port=port, stop=stop,
                         on_poll=announce_finished_runs)
        self.say(f"  launch finished in {time.time() - t0:.1f}s")

    def matched(self, r: Recipe, variant: str) -> Recipe:
        """Compute matching: with match=tokens a variant with m trajectories gets steps/m."""
        if self.recipe.study.match != "tokens" or r.dip.trajectories == 1 or r.dip.method == "none":
            return r
        steps = r.train.max_steps
        if steps is None:
            return r
        d = r.to_dict()
        d["train"]["max_steps"] = max(1, steps // r.dip.trajectories)
        return Recipe.model_validate(d)

    def _train_outputs(self, d: Path, variant: str, seed: int, key: str) -> dict:
        s = json.loads((d / "train_summary.json").read_text())
        # `key` (the run's input hash) makes the outputs' hash change whenever the weights do.
        return {"dir": str(d), "variant": variant, "seed": seed, "checkpoint": s["checkpoint"], "steps": s["steps"],
                "wall_s": s["wall_s"], "key": key}

    def stage_export(self) -> dict:
        from dipnet.eval.evaluate import model_fingerprint
        from dipnet.pipeline.export import export_checkpoint

        out = {}
        converted = self.dir / "convert" / "model"
        for run_id, t in self.manifest.outputs("train").items():
            from dipnet.pipeline.outputs import check_name

            check_name(run_id, f"{self.manifest.path}: train run")
            dest = self.dir / "export" / run_id
            ckpt = self.inside(t.get("checkpoint"), f"checkpoint of {run_id}")
            source = {"checkpoint": ckpt, "train_key": t.get("key"), "export": self.recipe.section_hash("export")}
            if (dest / "source.json").is_file() and _read_json(dest / "source.json") == source:
                self.say(f"  {run_id}: export up to date (skipped)")
            else:
                lora = any(f"{v}-s{sd}" == run_id and r.train.method == "lora" for v, sd, r in self.runs)
                s = export_checkpoint(ckpt, dest, dtype=self.recipe.export.dtype, tolerance=self.recipe.export.tolerance,
                                      trust_remote_code=self.recipe.model.trust_remote_code, base=converted,
                                      merge_lora=self.recipe.export.merge_lora or not lora)
                write_json_atomic(dest / "source.json", source)
                what = "a LoRA adapter of" if s.get("adapter") else "exported"
                self.say(f"  {run_id}: {what} {s['tensors']} tensors, max |Δlogit| {s['max_logit_diff']:.2e}")
            out[run_id] = {"model_dir": str(dest), "variant": t["variant"], "seed": t["seed"],
                           "fingerprint": model_fingerprint(dest)}
        return out

    def eval_targets(self) -> dict[str, dict]:
        models = {}
        if self.recipe.eval.eval_base:
            models["base"] = {"model_dir": self.base_dir(), "variant": "base", "seed": None}
        for name, m in self.manifest.outputs("export").items():
            from dipnet.pipeline.outputs import check_name

            check_name(name, f"{self.manifest.path}: export")
            models[name] = {**m, "model_dir": self.inside(m.get("model_dir"), f"export of {name}")}
        return models

    def stage_eval(self) -> dict:
        from dipnet.eval.evaluate import evaluate_model
        from dipnet.pipeline.trackers import eval_metrics

        e = self.recipe.eval
        out, failures = {}, []
        for name, m in self.eval_targets().items():
            dest = self.dir / "eval" / name
            key = self._eval_key(m)
            if (dest / "results.json").is_file() and (dest / "inputs.json").is_file() and \
                    _read_key(dest / "inputs.json") == key:
                out[name] = {**m, "results": str(dest / "results.json"), "key": key}
                continue
            try:
                with output_dir(dest, "eval", inputs=[m["model_dir"]], flag="eval directory") as tmp:
                    evaluate_model(m["model_dir"], list(e.tasks), tmp, engine=e.engine, shots=e.shots, limit=e.limit,
                                   max_new_tokens=e.max_new_tokens, chat=None if e.chat == "none" else e.chat,
                                   gsm8k_path=self.eval_gsm8k_path(), synthetic_settings=self.recipe.data.synthetic,
                                   dip_mode=e.dip_mode, noise_sigmas=list(e.noise_sigmas), progress=self.progress,
                                   harness_tasks=list(e.harness_tasks), answer_nll=e.answer_nll, dtype=e.dtype,
                                   context_bound=e.max_model_len, tensor_parallel_size=e.tensor_parallel_size,
                                   gpu_memory_utilization=e.gpu_memory_utilization, sampling=e.sampling(),
                                   label=name, trust_remote_code=self.recipe.model.trust_remote_code)
                    write_json_atomic(tmp / "inputs.json", {"key": key})
            except DipnetError as exc:
                failures.append(f"{name}: {exc}")
                continue  # results of the models already evaluated are kept
            out[name] = {**m, "results": str(dest / "results.json"), "key": key}
            if name in self.manifest.outputs("export"):  # a trained run: its scores join its tracker runs
                step = self.manifest.outputs("train").get(name, {}).get("steps")
                self.track(name, lambda t: t.log(eval_metrics(_read_json(dest / "results.json")), step))
        if failures:
            raise RunError(f"eval failed for {len(failures)} model(s): {failures[0]}")
        return out

    def _eval_key(self, m: dict) -> str:
        from dipnet.eval.evaluate import model_fingerprint

        from dipnet.eval.tasks import PROMPTS_VERSION

        return _hash([model_fingerprint(m["model_dir"]), self.recipe.section_hash("eval", "data"), PROMPTS_VERSION])

    def stage_report(self) -> dict:
        from dipnet.pipeline.report import write_report

        paths = write_report(self.dir, self.recipe)
        self.say(f"  report: {paths['report_md']}")
        self.track("report", lambda t: t.images(sorted((self.dir / "report").glob("*.png"))))
        return paths

    def track(self, run_name: str, fn) -> None:
        """Log to the recipe's experiment trackers as `run_name` of this study (a no-op without any)."""
        from dipnet.pipeline.trackers import open_run

        trackers = open_run(self.recipe, self.dir, run_name, self.dir / "eval")
        if trackers is not None:
            fn(trackers)
            trackers.finish()


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Every file of src under dst: a hard link where the file system allows, else a copy."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
            continue
        if p.name == ".dipnet.json":
            continue  # dst has its own marker
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p.resolve(), dst / rel)
        except OSError:
            shutil.copy2(p, dst / rel)


def download_model(repo_id: str) -> Path:
    """A hub model's safetensors, config and tokenizer files (where a hub is reachable)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model",
                                                                "*.jinja", "*.txt"]))
    except Exception as exc:
        raise UsageError(f"model.base: '{repo_id}' is not a local directory and the hub could not provide it "
                         f"({' '.join(str(exc).split())[:160]}); download it and give its directory") from None


def run_pipeline(recipe: Recipe, *, from_stage: str | None = None, only: str | None = None,
                 progress: bool = True, recipe_path: str | None = None) -> Path:
    """Run the stages of `recipe` in its run directory (`only`: one stage or a comma list)."""
    from dipnet.pipeline.env import usr1_noted

    only_set = set(only.split(",")) if only else None
    for name, vals in (("--from", [from_stage] if from_stage else []), ("--only", sorted(only_set or []))):
        for val in vals:
            if val not in STAGES:
                raise UsageError(f"{name} {val}: unknown stage; expected one of {', '.join(STAGES)}")
    claim_run_dir(recipe.output_dir.resolve())
    run = Run(recipe, progress=progress)
    with run_lock(run.dir), _sigterm_as_interrupt(), _preemption():
        resolved = run.dir / "recipe.yaml"
        tmp = resolved.with_name("recipe.yaml.tmp")
        tmp.write_text(f"# resolved from {recipe_path or 'recipe'} at {_now()}\n" +
                       yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        os.replace(tmp, resolved)
        from dipnet.pipeline.env import collect_env

        # The stack that ran (or last ran) this directory's stages: `dipnet env`, as data.
        run.manifest.data["environment"] = collect_env()
        run.manifest.save()
        forced = False
        for stage in STAGES:
            if only_set and stage not in only_set:
                continue
            if from_stage and stage == from_stage:
                forced = True
            inputs = run.stage_inputs(stage)
            if not (forced or only) and run.manifest.is_complete(stage, inputs):
                run.say(f"[{stage}] up to date (skipped)")
                continue
            run.say(f"[{stage}]")
            run.manifest.start(stage, inputs)
            try:
                if usr1_noted():  # it came while dipnet was starting: nothing to save yet
                    raise Preempted
                outputs = getattr(run, f"stage_{stage}")()
            except Preempted:
                # USR1 from Slurm before the time limit (or a preemption): the ranks have saved;
                # back in the queue under the same job id, the next start resumes.
                requeued = _requeue()
                what = "job requeued; it resumes from its latest checkpoint" if requeued else \
                    "job NOT requeued (scontrol requeue failed): resubmit with dipnet launch"
                run.manifest.finish(stage, "interrupted", error=f"preempted: {what}")
                run.say(f"[{stage}] preempted: {what}")
                raise
            except KeyboardInterrupt:
                run.manifest.finish(stage, "interrupted", error="interrupted (SIGINT/SIGTERM)")
                raise
            except DipnetError as exc:
                run.manifest.finish(stage, "failed", error=str(exc))
                raise
            except Exception as exc:
                run.manifest.finish(stage, "failed", error=f"{type(exc).__name__}: {exc}")
                raise
            run.manifest.finish(stage, "completed", outputs=outputs)
    return run.dir


class Preempted(BaseException):
    """Raised in the main process on SIGUSR1 inside a Slurm job (like KeyboardInterrupt, it
    passes through `except Exception`, and run_ranks stops the ranks on its way out)."""


@contextmanager
def _preemption():
    from dipnet.launch.slurm import in_slurm_job

    if not in_slurm_job():
        yield
        return

    def handler(signum, frame):
        raise Preempted

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, old)  # `dipnet` noted it before; a late one is moot (note_usr1_in_job)


def _requeue() -> bool:
    from dipnet.launch.slurm import requeue_this_job

    return requeue_this_job()


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM behaves like Ctrl-C: children are stopped and the manifest says 'interrupted'."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
