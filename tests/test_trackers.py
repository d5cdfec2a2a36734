"""Experiment trackers (train.report_to): a tiny study logs to W&B (offline files), a real MLflow
tracking server on SQLite started here on 127.0.0.1, and trackio's local store; each tracker's own
reader then shows every run of the study with its metrics, and the study's report plots."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import built_for_the_session, run_cli, write_recipe

from dipnet.launch.local import choose_master_port
from dipnet.pipeline.errors import UsageError
from dipnet.pipeline.trackers import check_trackers

STUDY = {
    "run": {"seed": 0},
    "data": {"synthetic": {"n_train": 64, "n_test": 16}, "max_length": 96},
    "train": {"max_steps": 3, "micro_batch_size": 4, "save_every": 3, "log_every": 1, "zero_stage": 1,
              "report_to": ["tensorboard", "wandb", "mlflow", "trackio"]},
    "launch": {"launcher": "single"},
    "eval": {"engine": "hf", "tasks": ["arith-id"], "limit": 4, "max_new_tokens": 16},
    "report": {"smoothness": False, "baseline": "sft"},
    "variants": {"sft": {"dip.method": "none"}, "dip": {"dip.method": "dip"}},
}
RUNS = {"sft-s0", "dip-s0"}


def start_mlflow_server(d: Path):
    """`mlflow server` on the SQLite store and artifacts under `d`, on 127.0.0.1 only; returns
    (process, url) once it answers /health."""
    port = choose_master_port(None)
    with open(d / "server.log", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{d}/mlflow.db", "--artifacts-destination", str(d / "artifacts"),
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=d, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                stop_mlflow_server(proc)
                raise RuntimeError(f"mlflow server did not start: {(d / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)


def stop_mlflow_server(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The study, run once for the whole session against a real MLflow server (xdist may hand
    this module's tests to both workers; each built it, 55-85 s of CPU twice). Yields the build
    directory, the environment the study ran with, and the URL of a server on its MLflow store:
    the builder's own, or one this worker starts on the finished store (its schema already made,
    so two servers never create it together)."""
    servers = []

    def build(root):
        (root / "mlflow").mkdir()
        proc, url = start_mlflow_server(root / "mlflow")
        servers.append((proc, url))
        env = {"WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb_files"), "WANDB_PROJECT": "dipnet-test",
               "WANDB_SILENT": "true", "TRACKIO_DIR": str(root / "trackio"), "MLFLOW_TRACKING_URI": url,
               "MLFLOW_EXPERIMENT_NAME": "dipnet-test"}
        (root / "wandb_files").mkdir()
        r = run_cli("run", write_recipe(root, "tracked", STUDY), cwd=root, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        (root / "env.json").write_text(json.dumps(env))

    try:
        root = built_for_the_session(tmp_path_factory, "tracked-study", build)
        if not servers:
            servers.append(start_mlflow_server(root / "mlflow"))
        yield root, json.loads((root / "env.json").read_text()), servers[0][1]
    finally:
        for proc, _ in servers:
            stop_mlflow_server(proc)


def wandb_records(path: Path):
    """The records of a W&B transaction log (`run-<id>.wandb`, what `wandb sync` uploads): a
    7-byte header (':W&B', magic 0xBEE1, version), then 32 KiB blocks of chunks, each
    (crc32 4, length 2, type 1: full, first, middle, last) as LevelDB's log; each record is a
    wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        block_left = 32768 - pos % 32768
        if block_left < 7:  # the block's tail is padding
            pos += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        buf += chunk
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def item_value(item):
    """A history item's value: typed (number, integer, ...) or JSON text, as the record carries it."""
    for field in ("number", "integer", "boolean", "text"):
        if item.HasField(field):
            return getattr(item, field)
    return json.loads(item.value_json) if item.value_json else None


def test_every_tracker_shows_every_run_of_the_study(study):
    tmp, env, mlflow_url = study
    # W&B: one offline run per training run, grouped, with each logged step and the eval scores.
    histories, groups, configs = {}, {}, {}
    for f in sorted((tmp / "wandb_files").rglob("run-*.wandb")):
        for rec in wandb_records(f):
            if rec.HasField("run"):
                groups[rec.run.display_name] = rec.run.run_group
                configs.setdefault(rec.run.display_name, {}).update(
                    {u.key: json.loads(u.value_json) for u in rec.run.config.update})
                name = rec.run.display_name
            elif rec.HasField("history"):
                histories.setdefault(name, []).append({i.key or "/".join(i.nested_key): item_value(i)
                                                        for i in rec.history.item})
    assert RUNS | {"report"} <= set(histories), sorted(histories)
    assert {groups[n] for n in RUNS | {"report"}} == {"tracked"}
    for run in RUNS:
        steps = [h for h in histories[run] if "train/loss" in h]
        assert [h["_step"] for h in steps] == [1, 2, 3] and all("train/grad_norm" in h for h in steps)
        assert any("eval/arith-id/flexible-extract" in h for h in histories[run])
        assert configs[run]["train.report_to"] and configs[run]["train.max_steps"] == 3
    assert any("lambda/0.dip_input" in h for h in histories["dip-s0"])
    assert any(k.startswith("report/") for h in histories["report"] for k in h)

    # MLflow, through the server: the study's parent run, every run under it with its metrics.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_url)
    exp = client.get_experiment_by_name("dipnet-test")
    runs = {x.info.run_name: x for x in client.search_runs([exp.experiment_id])}
    assert set(runs) == RUNS | {"tracked"}
    parent = runs["tracked"].info.run_id
    for run in RUNS:
        x = runs[run]
        assert x.data.tags["mlflow.parentRunId"] == parent and x.data.params["train.max_steps"] == "3"
        assert [m.step for m in client.get_metric_history(x.info.run_id, "train/loss")] == [1, 2, 3]
        assert "eval/arith-id/flexible-extract" in x.data.metrics and "eval/arith-id/answer_nll" in x.data.metrics
    assert any(a.path.startswith("report") for a in client.list_artifacts(parent))

    # trackio's local store: one project, every run and its logs.
    script = ("import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage as S\n"
              "runs = S.get_runs('tracked')\n"
              "print(json.dumps({r: S.get_logs('tracked', r) for r in runs}, default=str))")
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout
    logs = json.loads(out.strip().splitlines()[-1])
    assert RUNS <= set(logs)
    for run in RUNS:
        assert [row["step"] for row in logs[run] if "train/loss" in row] == [1, 2, 3]
        assert any("eval/arith-id/flexible-extract" in row for row in logs[run])


def test_no_credential_or_url_reaches_the_run_directory(study):
    tmp, env, _ = study
    for p in (tmp / "tracked").rglob("*"):
        if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".md", ".log", ".txt"):
            assert env["MLFLOW_TRACKING_URI"] not in p.read_text(errors="replace"), p


def test_a_missing_or_unreachable_tracker_fails_the_recipe_in_one_line(monkeypatch):
    port = choose_master_port(None)  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{port}")
    with pytest.raises(UsageError) as e:
        check_trackers(["mlflow"])
    assert str(e.value).startswith(f"train.report_to: mlflow cannot reach its server 127.0.0.1:{port} (")
    assert "secret" not in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(UsageError, match="wandb cannot reach its server .*; set WANDB_MODE=offline"):
        check_trackers(["wandb"])
    monkeypatch.setattr("dipnet.pipeline.trackers.PACKAGES", {"trackio": "trackio_not_installed"})
    with pytest.raises(UsageError, match=r"^train.report_to: trackio is not installed \(pip install trackio_not_installed\)$"):
        check_trackers(["trackio"])
