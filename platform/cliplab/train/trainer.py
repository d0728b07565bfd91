"""The driver side of a training job: MLflow run, Ray `TorchTrainer`, final artifacts and summary.

A run is named `<experiment>-<time>-<id>`; passing that name again (`cliplab train --resume NAME`)
reuses Ray's storage path + name, which resumes from the latest checkpoint (Train V2 semantics) and
continues the same MLflow run, whose id is kept next to the checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchConfig, TorchTrainer

from cliplab import storage as stores
from cliplab.config import Experiment, dump_yaml
from cliplab.errors import CliplabError
from cliplab.metrics import in_summary, is_headline
from cliplab.tracking.mlflow import MODEL_URI_TAG, RunLogger, create_run, resolve_tracking_uri
from cliplab.train.callbacks import StopOnStorageError
from cliplab.train.entry import train_loop_per_worker
from cliplab.worker_env import forwarded_env

log = logging.getLogger("cliplab.trainer")

RUN_FILE = "cliplab_run.json"
SUMMARY_KEYS = ("loss", "samples_per_s", "data_wait_frac", "data/skipped_samples", "logit_scale")


class TrainingFailed(CliplabError):
    """The Ray job failed after its retries; the message carries the worker's error."""


class TrainingInterrupted(CliplabError):
    """The run was stopped by a signal (SIGINT/SIGTERM) before its last step; `--resume` continues it."""


@dataclass
class TrainOutcome:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    storage: str
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None


def storage_root(exp: Experiment) -> str:
    """Ray's storage path: s3:// as given, local paths made absolute (Ray requires it)."""
    path = exp.storage.path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def new_run_name(exp: Experiment) -> str:
    return f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _run_file(storage: str, run_name: str) -> str:
    return f"{storage.rstrip('/')}/{run_name}/{RUN_FILE}"


def _mlflow_run(
    exp: Experiment,
    uri: str,
    storage: str,
    run_name: str,
    resume: bool,
    parent: str | None,
    tags: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> str:
    """The run's MLflow id: created now (with the extra tags and params), or read back from storage when resuming."""
    url = _run_file(storage, run_name)
    fs, path = stores.filesystem(url)
    if resume:
        if not stores.retrying(lambda: fs.exists(path), "reading", url):
            raise CliplabError(f"--resume {run_name}: no run of that name ({url} is missing)")
        run_id = json.loads(stores.retrying(lambda: fs.cat_file(path), "reading", url))["mlflow_run_id"]
        MlflowClient(uri).update_run(run_id, status="RUNNING")  # it was KILLED or FAILED
        return run_id
    run_id = create_run(
        exp, uri, run_name, parent_run_id=parent, tags={"ray.run_name": run_name, **(tags or {})}, params=params
    )
    body = json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri}).encode()
    try:
        stores.retrying(lambda: fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True), "creating", url)
        stores.retrying(lambda: fs.pipe_file(path, body), "writing", url)
    except Exception:
        MlflowClient(uri).set_terminated(run_id, "FAILED")  # storage is unusable: no run will follow
        raise
    return run_id


def loop_config(
    exp: Experiment, run_id: str, uri: str, storage: str, run_name: str, report_metrics: bool = False
) -> dict[str, Any]:
    """What every worker's `train_loop_per_worker` receives.

    `report_metrics`: hand every logged step's metrics to Ray Train (a sweep's scheduler reads them). A
    plain run reports only its checkpoints: rank 0 logs metrics to MLflow itself, and Ray Train's
    controller takes one report per worker per poll (every 2 s), so a report sent sooner blocks the step.
    """
    return {
        "experiment": exp.model_dump(mode="json"),
        "mlflow_run_id": run_id,
        "tracking_uri": uri,
        "export_dir": f"{storage.rstrip('/')}/{run_name}/export",
        "report_metrics": report_metrics,
    }


def worker_ops_dir(prefix: str) -> str:
    """The cache where Ray workers of the Python at `prefix` JIT-build DeepSpeed's ops (TORCH_EXTENSIONS_DIR).

    A build's command names its venv's paths and the driver builds with other flags, so a cache shared with
    the driver or with another venv is rebuilt (25-50 s on 2 cores) whenever the other side ran last.
    """
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:12]
    return str(Path.home() / ".cache" / "torch_extensions" / f"cliplab-ray-workers-{digest}")


def build_trainer(
    exp: Experiment, run_name: str, loop_config: dict[str, Any], storage: str, callbacks: list[Any] | None = None
) -> TorchTrainer:
    """The TorchTrainer for this experiment (shared by `cliplab train` and sweep trials)."""
    s = exp.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    env = forwarded_env()
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR") or worker_ops_dir(sys.prefix)
    if not s.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    path, filesystem = stores.ray_storage(storage, stores.RetryPolicy(outage_budget_s=exp.storage.outage_budget_s))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo", timeout_s=s.collective_timeout_s),
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=exp.train.keep_checkpoints),
            worker_runtime_env={"env_vars": env},
            callbacks=[StopOnStorageError(), *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # progress comes from rank 0's lines
        ),
    )


def run_training(
    exp: Experiment,
    resume: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> TrainOutcome:
    """Run (or resume) a training job to the end; raises TrainingFailed with the worker's error.

    `tags` and `params` are added to a new run's MLflow tags and params (a resumed run keeps its own).
    """
    stores.configure(exp.storage.outage_budget_s)
    storage, uri = storage_root(exp), resolve_tracking_uri(exp)
    run_name = resume or exp.tracking.run_name or new_run_name(exp)
    run_id = _mlflow_run(exp, uri, storage, run_name, resume is not None, parent_run_id, tags, params)
    log.info("run %s: storage %s/%s, MLflow run %s at %s", run_name, storage, run_name, run_id, uri)
    tracker = RunLogger(uri, run_id)
    trainer = build_trainer(exp, run_name, loop_config(exp, run_id, uri, storage, run_name), storage)
    try:
        with _sigterm_as_sigint():
            result = trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        tracker.finish("KILLED")
        raise
    except Exception as exc:
        tracker.finish("FAILED")
        raise TrainingFailed(f"run {run_name} failed: {exc}") from exc
    done = (result.metrics or {}).get("step")
    if done != exp.train.steps:  # Ray Train returns normally from a run aborted by SIGINT
        tracker.finish("KILLED")
        raise TrainingInterrupted(
            f"run {run_name} was interrupted (last checkpoint: step {done or 0} of {exp.train.steps}); "
            f"continue it with `cliplab train CONFIG --resume {run_name}`"
        )
    finish_run(exp, tracker, run_name)
    metrics = tracker.client.get_run(run_id).data.metrics
    return TrainOutcome(
        run_name=run_name,
        mlflow_run_id=run_id,
        tracking_uri=uri,
        storage=f"{storage.rstrip('/')}/{run_name}",
        metrics=metrics,
        checkpoint=_checkpoint_uri(storage, result.checkpoint.path) if result.checkpoint else None,
    )


@contextlib.contextmanager
def _sigterm_as_sigint() -> Iterator[None]:
    """During `fit()`, SIGTERM takes Ray Train's graceful SIGINT path (abort the controller and its workers).

    Ray installs its SIGINT handler inside `fit()`; both handlers are put back afterwards. Only the main
    thread can set handlers (Tune trials and tests run this in other threads: nothing changes there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])


def _checkpoint_uri(storage: str, path: str) -> str:
    """Ray's checkpoint path on its storage filesystem, as a URL (s3:// paths reach Ray without the scheme)."""
    scheme = storage.split("://", 1)[0] + "://" if "://" in storage else ""
    return path if not scheme or path.startswith(scheme) else scheme + path


def finish_run(
    exp: Experiment, tracker: RunLogger, run_name: str, status: str = "FINISHED", register: bool = True
) -> None:
    """Driver-side artifacts (resolved config, loss and eval curves, the registered model), then the status."""
    # imported here, once the run is over: matplotlib and MLflow's model flavours cost the start-up seconds
    from cliplab.tracking.plots import loss_curves
    from cliplab.tracking.registry import register_export

    run = tracker.client.get_run(tracker.run_id)
    metrics = run.data.metrics
    export = run.data.tags.get(MODEL_URI_TAG)
    if register and exp.tracking.log_model and export:
        name = exp.tracking.registered_model or f"cliplab-{exp.name}"
        version = register_export(tracker.client.tracking_uri, tracker.run_id, export, name)
        log.info("registered %s as MLflow model %s version %d", export, name, version)
    curves = [k for k in metrics if k == "loss" or k.startswith("loss_") or is_headline(k)]
    tracker.client.log_text(tracker.run_id, dump_yaml(exp), "config.yaml")
    tracker.figure(loss_curves({k: tracker.history(k) for k in curves}, run_name), "plots/loss_curve.png")
    tracker.finish(status)


def summary_table(outcome: TrainOutcome) -> str:
    """A short plain-text table of the final metrics a person checks first."""
    m = outcome.metrics
    keys = [k for k in SUMMARY_KEYS if k in m]
    keys += sorted(k for k in m if in_summary(k))
    width = max(len(k) for k in keys) if keys else 10
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{k.ljust(width)}  {m[k]:.4g}" for k in keys]
    return "\n".join(lines)
