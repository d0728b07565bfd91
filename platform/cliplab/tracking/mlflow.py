"""MLflow: one run per training job, created by the driver and written to by rank 0 only.

The tracking URI is always explicit (each Ray worker has its own working directory, so MLflow's
default `sqlite:///mlflow.db` would silently make one store per worker): MLFLOW_TRACKING_URI wins,
then `tracking.tracking_uri`, then a sqlite store in the driver's working directory.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from cliplab.config import Experiment

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_PARAM_LEN = 6000
MODEL_URI_TAG = "cliplab.model_uri"  # where a run's export lies (local or s3://), set by rank 0
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI's model-training view


def resolve_tracking_uri(exp: Experiment) -> str:
    """MLFLOW_TRACKING_URI, else the config's URI, else sqlite in the current directory (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or exp.tracking.tracking_uri
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def local_artifact_root(uri: str) -> str | None:
    """./mlartifacts beside a local sqlite store (MLflow's own default is ./mlruns in the working directory)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def default_artifact_location(uri: str, exp: Experiment) -> str | None:
    """Artifacts of a new experiment: the configured root, or ./mlartifacts beside a local sqlite store."""
    if exp.tracking.artifact_location:
        return exp.tracking.artifact_location.rstrip("/") + f"/{exp.tracking.experiment}"
    return local_artifact_root(uri)


def experiment_id(client: MlflowClient, exp: Experiment, uri: str) -> str:
    """The experiment's id, created if needed, filed as model training (MLflow 3 files a kindless one as GenAI)."""
    found = client.get_experiment_by_name(exp.tracking.experiment)
    if found is None:
        location = default_artifact_location(uri, exp)
        return client.create_experiment(exp.tracking.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
    for key, value in EXPERIMENT_KIND.items():
        if key not in found.tags:  # a kind the user chose stays
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def ui_hint(uri: str, run_id: str) -> str:
    """Where a person looks at the run: its page in MLflow's model-training view (MLflow 3.17's UI picks the
    view from the `workflowType` query or the browser's last choice, GenAI by default, not from the experiment's
    kind tag); a local store needs `mlflow ui` started first."""
    experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
    page = f"#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000/{page}"


def git_commit() -> str:
    """The source tree's commit, or 'unknown' outside a git checkout (e.g. a Ray working_dir upload)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else os.environ.get("CLIPLAB_GIT_COMMIT", "unknown")


def run_tags(exp: Experiment, extra: dict[str, str] | None = None) -> dict[str, str]:
    dataset = exp.data.train_shards.rstrip("/").split("/")[-2:]
    return {
        "objective": exp.objective.name,
        "model": exp.model.name or "inline",
        "dataset": "/".join(dataset),
        "git_commit": git_commit(),
        "cliplab.experiment": exp.name,
        **(extra or {}),
    }


ZERO_STAGE_USED = "deepspeed.zero_stage_used"  # the one param rank 0 logs itself: the ZeRO stage the engine ran


def params_of(exp: Experiment) -> dict[str, str]:
    """Flattened config as MLflow params (values cut to MLflow's limit)."""
    return {k: str(v)[:MAX_PARAM_LEN] for k, v in exp.flat().items()}


def create_run(
    exp: Experiment,
    uri: str,
    run_name: str,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> str:
    """Create the job's run with params (the config's, then `params`) and tags; returns its id (for the workers)."""
    client = MlflowClient(uri)
    all_tags = run_tags(exp, tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(client, exp, uri), run_name=run_name, tags=all_tags)
    params = [Param(k, v) for k, v in (params_of(exp) | (params or {})).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return run.info.run_id


class RunLogger:
    """Rank 0's handle on the job's run: metrics in batches, artifacts, tags."""

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.logged: dict[str, int] = {}

    def skip_logged_steps(self) -> None:
        """From now on, drop each key's steps up to the last one already in the run (read once, here).

        A worker group restarted from a checkpoint replays the steps since it; their metrics are in the
        run already, so logging them again would put each of those steps twice in the history.
        """
        keys = self.client.get_run(self.run_id).data.metrics
        self.logged = {k: max(m.step for m in self.client.get_metric_history(self.run_id, k)) for k in keys}

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if step > self.logged.get(k, -1)]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def figure(self, fig: Figure, artifact_file: str) -> None:
        from cliplab.tracking.figures import log_figure  # matplotlib only where a run draws

        log_figure(self.client, self.run_id, fig, artifact_file)

    def params(self, values: dict[str, Any]) -> None:
        """Params known only once a worker runs (a resumed run logs the same values again, which MLflow allows)."""
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in values.items()])

    def tags(self, values: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def history(self, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
