"""Evaluate an exported model (`<storage>/<run>/export`) on an experiment's held-out data, tracked in MLflow.

The model is rebuilt from the export itself (`cliplab_model.json`), so any architecture a run trained,
multi-branch towers included, loads back; the experiment config gives the held-out shards, the
zero-shot tasks and the caption slots. The work runs as a Ray task sized like one training worker (a GPU
when the experiment trains on GPUs), so on a cluster it lands on a worker node rather than the head.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
from mlflow.tracking import MlflowClient

from cliplab.config import Experiment
from cliplab.errors import ConfigError
from cliplab.tracking.mlflow import MODEL_URI_TAG, RunLogger, create_run, resolve_tracking_uri
from cliplab.worker_env import forwarded_env

log = logging.getLogger("cliplab.evaluate")


def model_location(uri: str, model: str | None, run_id: str | None) -> str:
    """The export to evaluate: given directly, or the `cliplab.model_uri` tag of an MLflow training run."""
    if model:
        return model
    if not run_id:
        raise ConfigError("evaluate: give --model EXPORT_DIR or --run MLFLOW_RUN_ID")
    try:
        tags = MlflowClient(uri).get_run(run_id).data.tags
    except Exception as exc:
        raise ConfigError(f"evaluate: --run {run_id}: no such run at {uri} ({exc})") from None
    if MODEL_URI_TAG not in tags:
        raise ConfigError(f"evaluate: --run {run_id} has no {MODEL_URI_TAG} tag (did it finish training?)")
    return tags[MODEL_URI_TAG]


def evaluate_export_here(exp_json: dict[str, Any], export_dir: str) -> dict[str, float]:
    """Load the export and run every held-out evaluation in this process."""
    import torch

    from cliplab.data.tokenize import build_tokenizer
    from cliplab.eval.runner import evaluate_experiment
    from cliplab.models.factory import load_exported

    exp = Experiment.model_validate(exp_json)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, pre, model_cfg = load_exported(export_dir)
    model = model.to(device).eval()
    tokenizer = build_tokenizer(model_cfg)
    return evaluate_experiment(model, exp, pre, tokenizer, device)


def evaluate_export(exp: Experiment, export_dir: str, source_run: str | None = None) -> tuple[dict[str, float], str]:
    """Evaluate in a Ray task, log the metrics to a new MLflow run; returns (metrics, run id)."""
    if not exp.data.val_shards:
        raise ConfigError("evaluate: the experiment has no data.val_shards")
    s = exp.scaling
    task = ray.remote(evaluate_export_here).options(
        num_cpus=s.cpus_per_worker,
        num_gpus=s.gpus_per_worker if s.use_gpu else 0,
        runtime_env={"env_vars": forwarded_env()},
    )
    uri = resolve_tracking_uri(exp)
    run_id = create_run(
        exp,
        uri,
        f"eval-{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={MODEL_URI_TAG: export_dir, "cliplab.evaluates": source_run or export_dir},
    )
    tracker = RunLogger(uri, run_id)
    log.info("evaluating %s on %s (MLflow run %s at %s)", export_dir, exp.data.val_shards, run_id, uri)
    try:
        metrics = ray.get(task.remote(exp.model_dump(mode="json"), export_dir))
    except Exception:
        tracker.finish("FAILED")
        raise
    tracker.metrics(metrics, step=0)
    tracker.finish("FINISHED")
    return metrics, run_id
