"""The staged run: all stages once, skipping on rerun, --from / --only, invalidation by
recipe change, the lock file, and atomic stage outputs."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import cli_in_process, run_cli, write_recipe

from dipnet.pipeline.env import omp_wait_settings
from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.recipe import load_recipe
from dipnet.pipeline.run import STAGES, run_lock, run_pipeline

FAST = {
    "run": {"seed": 0},
    "data": {"synthetic": {"n_train": 64, "n_test": 16}, "max_length": 96},
    "train": {"max_steps": 4, "micro_batch_size": 4, "save_every": 4, "log_every": 1, "zero_stage": 1},
    "launch": {"launcher": "single"},
    "eval": {"engine": "hf", "tasks": ["arith-id"], "limit": 8, "max_new_tokens": 24},
    "report": {"smoothness": False},
}


def fast_recipe(tmp_path, extra=None, name="fast"):
    return write_recipe(tmp_path, name, FAST, extra)


def stage_log(out: str) -> dict:
    """{stage: 'ran' | 'skipped'} from `dipnet run` output."""
    res = {}
    for line in out.splitlines():
        for s in STAGES:
            if line.startswith(f"[{s}]"):
                res[s] = "skipped" if "up to date" in line else "ran"
    return res


@pytest.mark.slow
def test_stages_run_skip_from_only_and_invalidate(tmp_path, tiny_base_dir):
    p = fast_recipe(tmp_path)
    r1 = cli_in_process("run", p, cwd=tmp_path)
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert stage_log(r1.stdout) == {s: "ran" for s in STAGES}
    assert re.search(r"^  main-s0: trained \d+ steps in \d+s, final loss \d", r1.stdout, re.M), r1.stdout
    run_dir = tmp_path / "fast"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "completed" for s in STAGES)
    import torch

    assert manifest["environment"]["torch"]["version"] == torch.__version__  # `dipnet env`, as data
    for s in ("base", "convert", "preprocess", "train", "export", "eval"):
        assert (run_dir / s).is_dir(), s
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "report.md").is_file()
    assert (run_dir / "train" / "main-s0" / "checkpoints" / "latest").is_file()
    assert (run_dir / "eval" / "main-s0" / "results.json").is_file()
    assert not list(run_dir.rglob("*.tmp-*"))

    r2 = cli_in_process("run", p, cwd=tmp_path)
    assert r2.returncode == 0 and stage_log(r2.stdout) == {s: "skipped" for s in STAGES}

    r3 = cli_in_process("run", p, "--from", "export", cwd=tmp_path)
    assert r3.returncode == 0, r3.stderr[-2000:]
    log = stage_log(r3.stdout)
    assert [s for s in STAGES if log[s] == "ran"] == ["export", "eval", "report"]

    r4 = cli_in_process("run", p, "--only", "report", cwd=tmp_path)
    assert r4.returncode == 0 and stage_log(r4.stdout) == {"report": "ran"}
    (run_dir / "report.md").unlink()
    r4b = cli_in_process("report", run_dir, "--no-smoothness", cwd=tmp_path)  # regenerated from stored results
    assert r4b.returncode == 0 and (run_dir / "report.md").is_file() and "| main |" in r4b.stdout

    # Changing what eval reads re-runs eval and report only; a harness task gets its report row.
    r5 = cli_in_process("run", p, "eval.limit=4", "eval.harness_tasks=[dipnet_arith_id]", cwd=tmp_path)
    assert r5.returncode == 0, r5.stderr[-2000:]
    log = stage_log(r5.stdout)
    assert [s for s in STAGES if log[s] == "ran"] == ["eval", "report"]
    res = json.loads((run_dir / "eval" / "main-s0" / "results.json").read_text())
    assert res["tasks"]["arith-id"]["n"] == 4
    assert set(res["harness"]["dipnet_arith_id"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert list((run_dir / "eval" / "main-s0" / "harness").glob("*/samples_dipnet_arith_id_*.jsonl"))
    assert "| main | dipnet_arith_id | exact_match,flexible-extract |" in (run_dir / "report.md").read_text()


def test_env_command():
    # Beside a process that keeps a core busy, the CLI lets OpenMP threads sleep (spinning ones
    # were 10x slower there); on idle cores they spin; a user's own choice stands.
    bare = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "DIPNET_OMP_WAIT")}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        res = subprocess.run([sys.executable, "-m", "dipnet.pipeline.cli", "env", "--json"], env=bare,
                             capture_output=True, text=True, timeout=300)
    finally:
        busy.kill()
        busy.wait()
    assert res.returncode == 0, res.stderr[-1000:]
    env = json.loads(res.stdout)
    assert env["torch"]["omp_wait_policy"] == "PASSIVE", env["torch"]
    assert env["torch"]["omp_wait_choice"].startswith("passive: other processes use")
    assert omp_wait_settings(0.1) == {"DIPNET_OMP_WAIT": "spin: other processes use 0.1 cores"}
    assert omp_wait_settings(0.9)["OMP_WAIT_POLICY"] == "PASSIVE"
    import torch

    assert env["torch"]["version"] == torch.__version__ and env["packages"]["transformers"]
    assert "cpu_adam" in env["deepspeed_ops"]
    flags = open("/proc/cpuinfo").read()  # bf16 is native exactly where the CPU has the instructions
    assert env["cpu_bf16"] == ("avx512_bf16" in flags or "amx_bf16" in flags)
    text = run_cli("env", "--no-ops", env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert text.returncode == 0 and "vLLM build" in text.stdout and len(text.stdout.splitlines()) <= 40
    assert "OMP_WAIT_POLICY ACTIVE" in text.stdout


def test_deepspeed_loads_without_mlflow():
    """Every rank imports deepspeed, whose autotuner imports MLflow when it is installed (1.1 s a
    process); dipnet hides it while deepspeed loads, and a later `import mlflow` (the tracker) works."""
    code = ("import sys; from dipnet.pipeline.env import import_deepspeed; import_deepspeed(); "
            "assert 'mlflow' not in sys.modules; from deepspeed.autotuning import autotuner; "
            "assert not autotuner.has_mlflow; import mlflow; mlflow.set_tracking_uri; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.splitlines()[-1] == "ok", res.stdout[-500:] + res.stderr[-2000:]


def test_lock_refuses_second_run(tmp_path):
    run_dir = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, pathlib; from dipnet.pipeline.outputs import claim_run_dir; from dipnet.pipeline.run import run_lock\n"
        f"claim_run_dir(pathlib.Path({str(run_dir)!r}))\n"
        f"with run_lock(pathlib.Path({str(run_dir)!r})):\n"
        "    print('held', flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=f"another dipnet run \\(PID {holder.pid}\\) is writing this run directory"):
            with run_lock(run_dir):
                pass
        p = fast_recipe(tmp_path, name="locked")
        res = run_cli("run", p, cwd=tmp_path)
        assert res.returncode == 2 and f"PID {holder.pid}" in res.stderr and "Traceback" not in res.stderr
    finally:
        holder.kill()
        holder.wait()
    with run_lock(run_dir):  # released when its holder died
        pass


def test_unknown_stage_names(tmp_path):
    r = load_recipe(fast_recipe(tmp_path))
    with pytest.raises(UsageError, match="--from trian: unknown stage"):
        run_pipeline(r, from_stage="trian", progress=False)


def test_interrupted_convert_is_simply_rerun(tmp_path, tiny_base_dir, monkeypatch):
    """A stage killed mid-write leaves only a .tmp- directory; the rerun completes it."""
    from dipnet.pipeline import convert as conv

    r = load_recipe(fast_recipe(tmp_path, name="atomic"))
    calls = {"n": 0}
    orig = conv.copy_tokenizer_files

    def crash(*a, **k):
        calls["n"] += 1
        raise KeyboardInterrupt  # as if Ctrl-C arrived while the weights were being written

    monkeypatch.setattr(conv, "copy_tokenizer_files", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(r, only=None, progress=False)
    run_dir = tmp_path / "atomic"
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["stages"]["convert"]["status"] == "interrupted"
    assert not (run_dir / "convert" / "model").exists()  # nothing half-written under the real name
    monkeypatch.setattr(conv, "copy_tokenizer_files", orig)
    run_pipeline(r, only="convert", progress=False)
    assert (run_dir / "convert" / "model" / "dip" / "dip.safetensors").is_file()
    assert json.loads((run_dir / "manifest.json").read_text())["stages"]["convert"]["status"] == "completed"
    assert calls["n"] == 1


def test_study_match_tokens_divides_steps(tmp_path):
    from dipnet.pipeline.run import Run

    r = load_recipe(fast_recipe(tmp_path, {"study": {"match": "tokens"}, "train": {"max_steps": 12}}))
    raw = r.to_dict()
    raw["variants"] = {"sft": {"dip.method": "none"}, "dip2": {"dip.trajectories": 2}, "dip4": {"dip.trajectories": 4}}
    from dipnet.pipeline.recipe import Recipe

    run = Run(Recipe.model_validate(raw), progress=False)
    steps = {v: run.matched(rr, v).train.max_steps for v, _, rr in run.runs}
    assert steps == {"sft": 12, "dip2": 6, "dip4": 3}


@pytest.mark.slow
def test_time_budget_stops_and_saves(tmp_path, tiny_base_dir):
    import json as _json

    from trainhelp import make_recipe

    from dipnet.launch import local as launch
    from dipnet.pipeline.data import preprocess

    r = make_recipe({"train.max_steps": 100000, "train.save_every": 100000, "launch.launcher": "single"})
    meta = preprocess(r.data, tiny_base_dir, tmp_path / "pre")
    out = tmp_path / "timed"
    out.mkdir()
    (out / "recipe.json").write_text(_json.dumps(r.to_dict()))
    port = launch.free_port()
    cmd = launch.train_command(r.launch, 1, port, ["--recipe", str(out / "recipe.json"), "--model", str(tiny_base_dir),
                                                   "--data", meta["path"], "--out", str(out), "--max-seconds", "2"])
    launch.run_ranks(cmd, launch.rank_env(1, port), out / "train.log", 300, single=True, port=port)
    s = _json.loads((out / "train_summary.json").read_text())
    assert 1 <= s["steps"] < 1000 and (out / "checkpoints" / f"step-{s['steps']:06d}").is_dir()


def test_lock_without_flock(tmp_path):
    """File systems without flock: an atomically created lock file with host, PID and heartbeat."""
    import os
    import socket

    run_dir = tmp_path / "nolock"
    env = {**os.environ, "DIPNET_LOCK": "file"}
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time, pathlib; from dipnet.pipeline.run import run_lock\n"
        f"with run_lock(pathlib.Path({str(run_dir)!r})):\n"
        "    print('held', flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        held = json.loads((run_dir / ".lock.held").read_text())
        assert held == {"host": socket.gethostname(), "pid": holder.pid}
        os.environ["DIPNET_LOCK"] = "file"
        with pytest.raises(UsageError, match=f"another dipnet run \\(PID {holder.pid} on {socket.gethostname()}\\)"):
            with run_lock(run_dir):
                pass
    finally:
        holder.kill()
        holder.wait()
    try:
        # The holder died without releasing: its lock is stale (same host, PID gone) and taken over.
        assert (run_dir / ".lock.held").is_file()
        with run_lock(run_dir):
            assert json.loads((run_dir / ".lock.held").read_text())["pid"] == os.getpid()
        assert not (run_dir / ".lock.held").exists()
        # Another host's lock with a fresh heartbeat is respected; an old one is stale.
        (run_dir / ".lock.held").write_text(json.dumps({"host": "othernode", "pid": 1}))
        with pytest.raises(UsageError, match="PID 1 on othernode"):
            with run_lock(run_dir):
                pass
        os.utime(run_dir / ".lock.held", (0, 0))
        with run_lock(run_dir):
            pass
    finally:
        os.environ.pop("DIPNET_LOCK", None)


def test_flock_unsupported_falls_back(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with run_lock(tmp_path / "r"):
        assert (tmp_path / "r" / ".lock.held").is_file()
    assert not (tmp_path / "r" / ".lock.held").exists()


@pytest.mark.slow
def test_later_stages_read_only_the_run_directory(tmp_path, tiny_base_dir):
    """The first stages stage data into the run directory; with the sources gone and the hub
    off, training, export and evaluation still run (offline compute nodes)."""
    from dipnet.pipeline import synthetic

    src = tmp_path / "src"
    src.mkdir()
    rows = synthetic.generate_split(40, 5, ood=False)
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    p = fast_recipe(tmp_path, {"data": {"train": str(src / "train.jsonl")},
                               "eval": {"tasks": ["gsm8k"], "gsm8k_path": str(src), "limit": 4}}, name="offline")
    r1 = cli_in_process("run", p, "--only", "base,convert,preprocess", cwd=tmp_path)
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert (tmp_path / "offline" / "data" / "gsm8k" / "test.jsonl").is_file()
    # The sources become unusable (a compute node that cannot reach them): later stages must not read them.
    (src / "train.jsonl").write_text("{not json\n")
    (src / "test.jsonl").unlink()
    r2 = cli_in_process("run", p, "--only", "train,export,eval", cwd=tmp_path,
                 env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r2.returncode == 0, r2.stderr[-2000:]
    res = json.loads((tmp_path / "offline" / "eval" / "main-s0" / "results.json").read_text())
    assert res["tasks"]["gsm8k"]["n"] == 4


def test_slurm_durations_and_offline_later_jobs(tmp_path):
    from argparse import Namespace

    from dipnet.launch import slurm

    assert slurm.parse_slurm_time("1-02:03:04") == 93784 and slurm.parse_slurm_time("05:00") == 300
    assert slurm.parse_slurm_time("UNLIMITED") is None and slurm.parse_slurm_time("NOT_SET") is None
    r = load_recipe(fast_recipe(tmp_path))
    s = slurm.slurm_settings(r, Namespace(nodes=None, gpus_per_node=None, cpus_per_task=None, partition=None,
                                          time=None, account=None, launcher=None))
    texts = {name: slurm.render_job(r, tmp_path / "r.yaml", tmp_path / "run", name, st, s) for name, st in slurm.CHAIN}
    assert "HF_HUB_OFFLINE" not in texts["preprocess"]
    assert all("export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1" in texts[n] for n in ("train", "export", "eval"))
    assert all("#SBATCH --requeue" in t and "#SBATCH --signal=B:USR1@180" in t for t in texts.values())
    assert 'export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))' in texts["train"]


@pytest.mark.slow
def test_checkpoint_every_few_seconds(tmp_path, tiny_base_dir):
    from trainhelp import train

    out = tmp_path / "minutes"
    train(out, {"train.max_steps": 12, "train.save_every": 100, "train.save_every_minutes": 0.0001,
                "train.keep_last": 100, "launch.launcher": "single"}, procs=1)
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert len(steps) >= 10, steps  # save_every alone would give only step-000012
