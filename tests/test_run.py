"""The staged run: all stages once, skipping on rerun, --from / --only, invalidation by
recipe change, the lock file, and atomic stage outputs."""

import json
import subprocess
import sys

import pytest
from conftest import run_cli, write_recipe

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
    r1 = run_cli("run", p, cwd=tmp_path)
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert stage_log(r1.stdout) == {s: "ran" for s in STAGES}
    run_dir = tmp_path / "fast"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "completed" for s in STAGES)
    for s in ("base", "convert", "preprocess", "train", "export", "eval"):
        assert (run_dir / s).is_dir(), s
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "report.md").is_file()
    assert (run_dir / "train" / "main-s0" / "checkpoints" / "latest").is_file()
    assert (run_dir / "eval" / "main-s0" / "results.json").is_file()
    assert not list(run_dir.rglob("*.tmp-*"))

    r2 = run_cli("run", p, cwd=tmp_path)
    assert r2.returncode == 0 and stage_log(r2.stdout) == {s: "skipped" for s in STAGES}

    r3 = run_cli("run", p, "--from", "export", cwd=tmp_path)
    assert r3.returncode == 0, r3.stderr[-2000:]
    log = stage_log(r3.stdout)
    assert [s for s in STAGES if log[s] == "ran"] == ["export", "eval", "report"]

    r4 = run_cli("run", p, "--only", "report", cwd=tmp_path)
    assert r4.returncode == 0 and stage_log(r4.stdout) == {"report": "ran"}
    (run_dir / "report.md").unlink()
    r4b = run_cli("report", run_dir, "--no-smoothness", cwd=tmp_path)  # regenerated from stored results
    assert r4b.returncode == 0 and (run_dir / "report.md").is_file() and "| main |" in r4b.stdout

    # Changing what eval reads re-runs eval and report only.
    r5 = run_cli("run", p, "eval.limit=4", cwd=tmp_path)
    assert r5.returncode == 0, r5.stderr[-2000:]
    log = stage_log(r5.stdout)
    assert [s for s in STAGES if log[s] == "ran"] == ["eval", "report"]
    res = json.loads((run_dir / "eval" / "main-s0" / "results.json").read_text())
    assert res["tasks"]["arith-id"]["n"] == 4


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
