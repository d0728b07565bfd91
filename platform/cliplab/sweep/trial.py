"""One sweep trial: a Tune function trainable that drives the same TorchTrainer as `cliplab train`.

Ray 2.60's Train V2 pattern (ray-stack.md §1): the trial function builds and fits the TorchTrainer, and a
`TuneReportCallback` hands rank 0's reports to Tune. The Train run is named `<sweep>-<trial id>`, so a
retried or restored trial resumes its own run from its last checkpoint, and its MLflow child run is looked
up by trial id before one is created, so a restored sweep never duplicates it. A restored trial whose child
run had already finished is not trained again: its recorded final metrics are reported to Tune.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune
from ray.train._internal.session import get_session
from ray.tune.integration.ray_train import TuneReportCallback

from cliplab.config import Experiment
from cliplab.sweep.config import experiment_at
from cliplab.tracking.mlflow import RunLogger, create_run, experiment_id
from cliplab.train.trainer import build_trainer, finish_run, loop_config

log = logging.getLogger("cliplab.sweep")
TRIAL_TAG = "cliplab.trial_id"
STATUS_TAG = "cliplab.trial_status"


class MetricReports(TuneReportCallback):
    """Forward only the reports that carry the sweep metric (Tune refuses results without it)."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def stopped_by_tune() -> bool:
    """Tune has ended this trial's session (a scheduler's early stop): the Train run then fails on its way out.

    Tune's cleanup shuts the trial's session down before the run notices (ray.tune FunctionTrainable.cleanup).
    """
    return get_session() is None


def find_child(client: MlflowClient, experiment: str, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow run of this trial under this sweep's parent run, if it exists."""
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
    runs = client.search_runs([experiment], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def child_run(exp: Experiment, uri: str, parent_run_id: str, sweep: str, trial_id: str, point: dict[str, Any]) -> str:
    """This trial's child run: the existing one after a restore, else a new one with a plain run's params."""
    client = MlflowClient(uri)
    found = find_child(client, experiment_id(client, exp, uri), parent_run_id, trial_id)
    if found:
        return found
    tags = {
        TRIAL_TAG: trial_id,
        "cliplab.sweep": sweep,
        "ray.run_name": f"{sweep}-{trial_id}",
        "cliplab.sampled": json.dumps(point),
    }
    return create_run(exp, uri, f"{sweep}-{trial_id}", parent_run_id=parent_run_id, tags=tags)


def finished_result(client: MlflowClient, run_id: str, steps: int) -> dict[str, float] | None:
    """The final metrics of a child run that trained to its end, else None.

    Tune saves its own state at most every 10 s, so a sweep stopped just after a trial finished restores
    that trial as unfinished, with an older result. Its Train run would resume at its last step and
    report nothing, and the sweep would take the old result for an early stop; the child run's final
    metrics are what Tune missed.
    """
    run = client.get_run(run_id)
    if run.info.status != "FINISHED" or run.data.tags.get(STATUS_TAG) != "TERMINATED":
        return None
    return {**run.data.metrics, "step": steps}


def run_trial(
    point: dict[str, Any],
    *,
    base_tree: dict[str, Any],
    sweep: str,
    parent_run_id: str,
    uri: str,
    storage: str,
    metric: str,
) -> None:
    """Tune function trainable: train the base experiment at `point` (a dict of dotted field -> value)."""
    trial_id = tune.get_context().get_trial_id()
    exp = experiment_at(base_tree, point, f"sweep {sweep} trial {trial_id}")
    run_name = f"{sweep}-{trial_id}"
    run_id = child_run(exp, uri, parent_run_id, sweep, trial_id, point)
    tracker = RunLogger(uri, run_id)
    done = finished_result(tracker.client, run_id, exp.train.steps)
    if done is not None:
        log.info("trial %s had finished before the sweep stopped: its recorded result is reported again", trial_id)
        tune.report(done)
        return
    tracker.tags({STATUS_TAG: "RUNNING"})
    trainer = build_trainer(
        exp,
        run_name,
        loop_config(exp, run_id, uri, storage, run_name, report_metrics=True),
        storage,
        callbacks=[MetricReports(metric)],
    )
    try:
        trainer.fit()
    except Exception as exc:
        if stopped_by_tune():  # the sweep's driver records the early stop; an ERROR here would race with it
            raise
        tracker.tags({STATUS_TAG: "ERROR", "cliplab.error": str(exc)[:4000]})
        tracker.finish("FAILED")
        raise
    tracker.tags({STATUS_TAG: "TERMINATED"})
    finish_run(exp, tracker, run_name, register=False)  # a sweep registers no trial's model
