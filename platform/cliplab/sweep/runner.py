"""Run (or resume) a sweep: one MLflow parent run, a Ray Tune run of function trials, the summary on the parent.

The sweep is named `<sweep name>-<time>-<id>`; `--resume NAME` restores Tune's state from the same storage
(finished and failed trials are kept, unfinished ones restart and resume their Train runs from their last
checkpoint) and continues the same parent run, whose id is kept next to Tune's state.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import ray
from mlflow.tracking import MlflowClient
from ray import tune

from cliplab.config import Experiment, dump_yaml, validate_tree
from cliplab.credentials import keys_in_private_file
from cliplab.errors import CliplabError, ConfigError
from cliplab.resources import worker_resources
from cliplab.sweep.config import SweepConfig, experiment_at
from cliplab.sweep.report import ProgressTable, TrialRow, metric_vs_fields, parallel_coordinates, write_csv
from cliplab.sweep.trial import STATUS_TAG, find_child, run_trial
from cliplab.tracking.figures import log_figure
from cliplab.tracking.mlflow import experiment_id, resolve_tracking_uri
from cliplab.train.trainer import storage_root

log = logging.getLogger("cliplab.sweep")
STATE_FILE = "cliplab_sweep.json"


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    rows: list[TrialRow]
    best: TrialRow | None


def tune_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's param space: one entry per dotted field."""
    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
    }
    return {name: make[d.kind](getattr(d, d.kind)) for name, d in sweep.space.items()}


def trial_resources(sweep: SweepConfig, exp: Experiment) -> dict[str, float]:
    """What one trial holds: its driver's CPU plus every Train worker's request."""
    return worker_resources(exp.scaling, extra_cpus=sweep.trial_cpus)


def concurrency(sweep: SweepConfig, exp: Experiment, cluster: dict[str, float]) -> int:
    """Trials that fit at once; refuses a sweep whose single trial can never be placed (Tune would wait forever)."""
    need = trial_resources(sweep, exp)
    fits = min(math.floor(cluster.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0)
    if fits < 1:
        have = {k: cluster.get(k, 0) for k in need}
        raise ConfigError(
            f"sweep: one trial needs {need} (trial_cpus {sweep.trial_cpus} + {exp.scaling.num_workers} workers x "
            f"scaling.cpus_per_worker {exp.scaling.cpus_per_worker}), the Ray cluster has {have}; lower "
            "scaling.cpus_per_worker or scaling.num_workers in the sweep's overrides, or add nodes"
        )
    return min(fits, sweep.max_concurrent) if sweep.max_concurrent else fits


def _search(sweep: SweepConfig, parallel: int) -> Any:
    """Random/grid variants or Optuna, each capped at `parallel` running trials.

    Tune ignores `TuneConfig.max_concurrent_trials` for a variant generator, so the cap goes into the
    generator itself (and into a ConcurrencyLimiter for Optuna).
    """
    if sweep.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=parallel)
    try:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=sweep.seed), max_concurrent=parallel)
    except (ImportError, AssertionError) as exc:
        raise ConfigError(f"search: optuna needs the optuna package ({exc}); pip install 'cliplab[optuna]'") from None


def _scheduler(sweep: SweepConfig, exp: Experiment) -> Any:
    if sweep.scheduler.name == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="step",
        max_t=exp.train.steps,
        grace_period=sweep.scheduler.grace_period,
        reduction_factor=sweep.scheduler.reduction_factor,
    )


def _state(storage: str, name: str) -> tuple[Any, str]:
    fs, root = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/{name}/{STATE_FILE}")
    return fs, root


def _parent_run(
    sweep: SweepConfig, exp: Experiment, uri: str, storage: str, name: str, resume: bool, sweep_file: Path
) -> str:
    fs, path = _state(storage, name)
    if resume:
        if not fs.exists(path):
            raise CliplabError(f"--resume {name}: no sweep of that name under {storage}")
        return json.loads(fs.cat_file(path))["parent_run_id"]
    client = MlflowClient(uri)
    parent = client.create_run(
        experiment_id(client, exp, uri), run_name=name, tags={"cliplab.sweep": sweep.name, "cliplab.sweep_run": name}
    )
    client.log_param(parent.info.run_id, "sweep.metric", sweep.metric)
    client.log_param(parent.info.run_id, "sweep.mode", sweep.mode)
    client.log_param(parent.info.run_id, "sweep.num_samples", sweep.num_samples)
    client.log_param(parent.info.run_id, "sweep.search", sweep.search)
    client.log_param(parent.info.run_id, "sweep.scheduler", sweep.scheduler.model_dump_json())
    for field, dist in sweep.space.items():
        client.log_param(parent.info.run_id, f"sweep.space.{field}", dist.model_dump_json(exclude_none=True))
    client.log_artifact(parent.info.run_id, str(sweep_file))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, json.dumps({"parent_run_id": parent.info.run_id, "tracking_uri": uri}).encode())
    return parent.info.run_id


def run_sweep(
    sweep: SweepConfig, base_tree: dict[str, Any], sweep_file: Path, resume: str | None = None
) -> SweepOutcome:
    """Run every trial to its end (or early stop / failure) and summarise on the parent run."""
    exp = validate_tree(base_tree, str(sweep_file))
    uri, storage = resolve_tracking_uri(exp), storage_root(exp)
    name = resume or f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    parallel = concurrency(sweep, exp, ray.cluster_resources())
    parent = _parent_run(sweep, exp, uri, storage, name, resume is not None, sweep_file)
    log.info(
        "sweep %s: %d trial(s) at a time, each %s; MLflow parent run %s at %s",
        name,
        parallel,
        trial_resources(sweep, exp),
        parent,
        uri,
    )

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base_tree=base_tree,
            sweep=name,
            parent_run_id=parent,
            uri=uri,
            storage=storage,
            metric=sweep.metric,
        ),
        {"CPU": sweep.trial_cpus},
    )
    fields = list(sweep.space)
    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        callbacks=[ProgressTable(fields, sweep.metric)],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=sweep.max_trial_failures),
    )
    path = f"{storage.rstrip('/')}/{name}"
    with keys_in_private_file():  # Tune would copy AWS keys into each trial's runtime env, and Ray logs it
        grid = _tuner(trainable, sweep, exp, run_config, path, parallel, resume).fit()
    rows = _rows(grid, sweep, exp, uri, parent)
    best = _best(rows, sweep)
    _summarise(sweep, base_tree, uri, parent, rows, best, str(sweep_file))
    return SweepOutcome(name=name, parent_run_id=parent, tracking_uri=uri, rows=rows, best=best)


def _tuner(
    trainable: Any, sweep: SweepConfig, exp: Experiment, run_config: Any, path: str, parallel: int, resume: str | None
) -> tune.Tuner:
    if resume:
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space=tune_space(sweep),
        run_config=run_config,
        tune_config=tune.TuneConfig(
            metric=sweep.metric,
            mode=sweep.mode,
            num_samples=sweep.num_samples,
            search_alg=_search(sweep, parallel),
            scheduler=_scheduler(sweep, exp),
        ),
    )


def _rows(grid: Any, sweep: SweepConfig, exp: Experiment, uri: str, parent: str) -> list[TrialRow]:
    """One row per trial, and each child run's final status tag (early-stopped trials never reach theirs)."""
    client = MlflowClient(uri)
    exp_id = experiment_id(client, exp, uri)
    rows = []
    for trial in tune.ExperimentAnalysis(grid.experiment_path).trials:
        point = {k: trial.config.get(k) for k in sweep.space}
        last = trial.last_result or {}
        step = last.get("step")
        run_id = find_child(client, exp_id, parent, trial.trial_id)
        error = trial.get_error() if trial.status == "ERROR" else None
        if error is not None:
            status = "ERROR"
        elif step is not None and step < int(point.get("train.steps", exp.train.steps)):
            status = "EARLY_STOPPED"
        else:
            status = "TERMINATED"
        rows.append(
            TrialRow(
                trial.trial_id,
                status,
                point,
                step,
                last.get(sweep.metric),
                run_id,
                str(error).strip().splitlines()[-1][:300] if error is not None else None,
            )
        )
        if run_id and status == "EARLY_STOPPED":
            client.set_tag(run_id, STATUS_TAG, "EARLY_STOPPED")
            client.set_terminated(run_id, "KILLED")
    return rows


def _best(rows: list[TrialRow], sweep: SweepConfig) -> TrialRow | None:
    scored = [r for r in rows if r.metric is not None and r.status != "ERROR"]
    if not scored:
        return None
    return (max if sweep.mode == "max" else min)(scored, key=lambda r: r.metric)


def _summarise(
    sweep: SweepConfig,
    base_tree: dict[str, Any],
    uri: str,
    parent: str,
    rows: list[TrialRow],
    best: TrialRow | None,
    source: str,
) -> None:
    client = MlflowClient(uri)
    fields = list(sweep.space)
    logs = {f for f, d in sweep.space.items() if d.kind == "loguniform"}
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(parent, str(write_csv(rows, fields, sweep.metric, Path(tmp) / "results.csv")))
        if any(r.metric is not None for r in rows):
            log_figure(client, parent, metric_vs_fields(rows, fields, sweep.metric, logs), "plots/metric_vs_fields.png")
            log_figure(
                client, parent, parallel_coordinates(rows, fields, sweep.metric, logs), "plots/parallel_coordinates.png"
            )
        if best is not None:
            best_exp = experiment_at(base_tree, best.point, source)
            cfg = Path(tmp) / "best_config.yaml"
            cfg.write_text(dump_yaml(best_exp.model_copy(update={"name": f"{best_exp.name}-best"})))
            client.log_artifact(parent, str(cfg))
            client.log_metric(parent, f"best/{sweep.metric}", best.metric)
            client.set_tag(parent, "cliplab.best_trial", best.trial_id)
            client.set_tag(parent, "cliplab.best_run_id", best.mlflow_run_id or "")
    counts = {s: sum(r.status == s for r in rows) for s in ("TERMINATED", "EARLY_STOPPED", "ERROR")}
    for status, n in counts.items():
        client.log_metric(parent, f"trials/{status.lower()}", n)
    client.set_terminated(parent, "FINISHED" if counts["TERMINATED"] + counts["EARLY_STOPPED"] else "FAILED")
