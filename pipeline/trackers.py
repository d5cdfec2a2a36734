"""Experiment trackers, as the Hugging Face Trainer's `report_to`: `train.report_to: [tensorboard,
wandb, mlflow, trackio]` (TensorBoard alone by default).

Only the main rank logs. Each training run is one tracker run named `<variant>-s<seed>`, and the
runs of one study are grouped: a W&B group and an MLflow parent run named after `run.name`, a
trackio project and group. A run logs its resolved recipe as parameters (flattened keys:
`train.lr`), every logged step (`train/loss`, `train/nll`, `train/prior`, `train/lr`,
`train/grad_norm`, `train/tokens_per_s`, `lambda/<layer>` means, `val/nll`), then, as the eval
stage finishes each model, its scores (`eval/<task>/<filter>`, `eval/<task>/answer_nll`); the report
stage attaches its plots to the study (the MLflow parent run, a W&B run `report` in the group, a
trackio run `report`).

Every tracker is configured the way its users configure it, by its own environment variables
(`WANDB_MODE`, `WANDB_DIR`, `WANDB_PROJECT`, `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`,
`TRACKIO_DIR`, `TRACKIO_PROJECT`, ...); credentials come from the environment or the tracker's own
login and are never written by dipnet. `check_trackers` runs before any rank starts: a tracker that
is not installed or cannot be reached fails the recipe in one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from dipnet.pipeline.errors import UsageError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


# ----------------------------------------------------------------------------- the recipe check

def check_trackers(report_to: list[str], where: str = "train.report_to") -> None:
    """Each tracker named is installed and, where it logs over the network, reachable."""
    for name in report_to:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UsageError(f"{where}: {name} is not installed (pip install {PACKAGES[name]})")
        server = _server(name)
        if server is not None:
            host, port = server
            try:
                socket.create_connection((host, port), timeout=3).close()
            except OSError as exc:
                hint = {"wandb": "set WANDB_MODE=offline to log to files", "mlflow": "check MLFLOW_TRACKING_URI",
                        "trackio": "unset TRACKIO_SERVER_URL/TRACKIO_SPACE_ID to log locally"}[name]
                raise UsageError(f"{where}: {name} cannot reach its server {host}:{port} "
                                 f"({exc.strerror or type(exc).__name__}); {hint}") from None
        if name == "wandb" and server is not None and not _wandb_has_key():
            raise UsageError(f"{where}: wandb is online but has no API key (set WANDB_API_KEY or run `wandb login`; "
                             "or WANDB_MODE=offline)")


def _server(name: str) -> tuple[str, int] | None:
    """(host, port) a tracker would send to, or None when it writes local files. Only the host and
    port: a URL's user and password never reach a message."""
    if name == "wandb":
        if os.environ.get("WANDB_MODE", "online") in ("offline", "disabled", "dryrun"):
            return None
        url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    elif name == "mlflow":
        url = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not url.startswith(("http://", "https://")):
            return None  # a local store (sqlite:, file:, a path, or MLflow's default)
    elif name == "trackio":
        if os.environ.get("TRACKIO_SPACE_ID"):
            url = "https://huggingface.co"
        elif os.environ.get("TRACKIO_SERVER_URL"):
            url = os.environ["TRACKIO_SERVER_URL"]
        else:
            return None
    else:
        return None
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")


# ----------------------------------------------------------------------------- names

def study_names(recipe, run_dir: Path) -> dict:
    """How this study's runs are found again by a later stage (eval, report) or a resumed run:
    the study's name and a key made of its run directory."""
    key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return {"study": recipe.run.name, "key": key,
            "wandb_project": os.environ.get("WANDB_PROJECT", "dipnet"),
            "mlflow_experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME", recipe.run.name),
            "trackio_project": os.environ.get("TRACKIO_PROJECT", recipe.run.name)}


def flat_params(d: dict, prefix: str = "") -> dict:
    """A nested recipe as {dotted key: value} (lists and None as text)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def step_metrics(rec: dict) -> dict:
    """One metrics.jsonl record as tracker metrics."""
    m = {f"train/{k}": rec[k] for k in ("loss", "nll", "prior", "var_penalty", "lr", "grad_norm", "tokens_per_s",
                                         "step_time_s", "tokens_seen") if isinstance(rec.get(k), (int, float))}
    m.update({f"lambda/{layer}": s["mean"] for layer, s in (rec.get("lambda") or {}).items()})
    m.update({f"val/{k[4:]}": rec[k] for k in ("val_nll", "val_token_acc") if k in rec})
    return m


def eval_metrics(results: dict) -> dict:
    m = {}
    for task, r in (results.get("tasks") or {}).items():
        for f, s in (r.get("scores") or {}).items():
            m[f"eval/{task}/{f}"] = s["accuracy"]
        if r.get("teacher_forced"):
            m[f"eval/{task}/answer_nll"] = r["teacher_forced"]["answer_nll"]
    return m


# ----------------------------------------------------------------------------- one run per tracker

class WandbRun:
    def __init__(self, names: dict, run_name: str, params: dict | None, out: Path):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=names["wandb_project"], group=names["study"], name=run_name,
                              id=f"{names['study']}-{names['key']}-{run_name}", resume="allow", config=params,
                              dir=os.environ.get("WANDB_DIR", str(out)), reinit="create_new")

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def images(self, paths: list[Path]) -> None:
        self.run.log({f"report/{p.stem}": self.wandb.Image(str(p)) for p in paths})

    def finish(self, summary: dict | None = None) -> None:
        if summary:
            self.run.summary.update(summary)
        self.run.finish()


class MlflowRun:
    def __init__(self, names: dict, run_name: str, params: dict | None, out: Path):
        # MLflow prints each run's URL, built from MLFLOW_TRACKING_URI (which may carry a password):
        # not into dipnet's logs unless the user asks for it.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        import mlflow

        client = mlflow.MlflowClient()
        exp = mlflow.set_experiment(names["mlflow_experiment"])
        tag = f"tags.dipnet_study = '{names['key']}'"
        parents = client.search_runs([exp.experiment_id], f"{tag} and tags.dipnet_role = 'study'", max_results=1)
        parent = parents[0].info.run_id if parents else client.create_run(
            exp.experiment_id, run_name=names["study"], tags={"dipnet_study": names["key"], "dipnet_role": "study"}
        ).info.run_id
        if run_name == "report":
            self.run_id = parent
        else:
            found = client.search_runs([exp.experiment_id], f"{tag} and tags.dipnet_run = '{run_name}'", max_results=1)
            self.run_id = found[0].info.run_id if found else client.create_run(
                exp.experiment_id, run_name=run_name,
                tags={"dipnet_study": names["key"], "dipnet_run": run_name, "mlflow.parentRunId": parent}).info.run_id
        self.client = client
        if params:
            from mlflow.entities import Param

            # MLflow keeps a parameter once: a resumed run logs only what it has not.
            have = client.get_run(self.run_id).data.params
            new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
            for i in range(0, len(new), 100):  # MLflow's batch limit
                client.log_batch(self.run_id, params=new[i:i + 100])

    def log(self, metrics: dict, step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])

    def images(self, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), artifact_path="report")

    def finish(self, summary: dict | None = None) -> None:
        self.client.set_terminated(self.run_id)


class TrackioRun:
    def __init__(self, names: dict, run_name: str, params: dict | None, out: Path):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=names["trackio_project"], name=run_name, group=names["study"], config=params,
                                resume="allow", embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def images(self, paths: list[Path]) -> None:
        self.run.log({f"report/{p.stem}": self.trackio.Image(str(p)) for p in paths})

    def finish(self, summary: dict | None = None) -> None:
        self.run.finish()


RUNS = {"wandb": WandbRun, "mlflow": MlflowRun, "trackio": TrackioRun}


class Trackers:
    """The recipe's trackers for one run (TensorBoard is written by the training loop itself). A
    tracker that fails while logging is reported once and dropped: training goes on."""

    def __init__(self, report_to: list[str], names: dict, run_name: str, params: dict | None, out: Path):
        self.runs = {}
        for name in report_to:
            if name in RUNS:
                self.runs[name] = RUNS[name](names, run_name, params, out)

    def _each(self, what: str, *args) -> None:
        for name, run in list(self.runs.items()):
            try:
                getattr(run, what)(*args)
            except Exception as exc:  # a tracker is never worth a training run
                print(f"warning: {name} failed to {what} ({' '.join(str(exc).split())[:200]}); "
                      f"no more logging to {name} in this run", file=sys.stderr, flush=True)
                del self.runs[name]

    def log(self, metrics: dict, step: int | None = None) -> None:
        if metrics:
            self._each("log", metrics, step)

    def images(self, paths: list[Path]) -> None:
        if paths:
            self._each("images", paths)

    def finish(self, summary: dict | None = None) -> None:
        self._each("finish", summary)


def open_run(recipe, run_dir: Path, run_name: str, out: Path, params: dict | None = None) -> Trackers | None:
    """The trackers of one run of the study in `run_dir` (None when the recipe names none but
    TensorBoard)."""
    if not any(t in RUNS for t in recipe.train.report_to):
        return None
    return Trackers(recipe.train.report_to, study_names(recipe, run_dir), run_name, params, out)
