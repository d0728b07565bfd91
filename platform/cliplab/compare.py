"""`cliplab compare A.yaml B.yaml ...`: same-budget runs as sibling MLflow runs under one parent, side by side.

All configs must read the same training shards; they run one after another on the same Ray cluster, and
the parent run gets a CSV of every run's final metrics and a bar chart of the held-out ones.
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from cliplab.config import Experiment
from cliplab.errors import ConfigError
from cliplab.metrics import compare_keys, is_train_metric
from cliplab.tracking.figures import log_figure
from cliplab.tracking.mlflow import experiment_id, resolve_tracking_uri
from cliplab.train.trainer import TrainOutcome, run_training

log = logging.getLogger("cliplab.compare")


def compare(experiments: list[Experiment]) -> tuple[str, list[TrainOutcome]]:
    """Train each experiment as a child of one parent run; returns (parent run id, outcomes)."""
    shards = {e.data.train_shards for e in experiments}
    if len(shards) > 1:
        raise ConfigError(f"compare: the configs read different data.train_shards {sorted(shards)}")
    first = experiments[0]
    uri = resolve_tracking_uri(first)
    client = MlflowClient(uri)
    parent = client.create_run(
        experiment_id(client, first, uri),
        run_name=f"compare-{'-vs-'.join(e.name for e in experiments)}-{time.strftime('%H%M%S')}",
        tags={"cliplab.compare": ",".join(e.name for e in experiments)},
    )
    outcomes = []
    try:
        for exp in experiments:
            exp = exp.model_copy(update={"tracking": first.tracking})
            log.info("compare: training %s (%s)", exp.name, exp.objective.name)
            outcomes.append(run_training(exp, parent_run_id=parent.info.run_id))
    except Exception:
        client.set_terminated(parent.info.run_id, "FAILED")
        raise
    _log_summary(client, parent.info.run_id, experiments, outcomes)
    client.set_terminated(parent.info.run_id, "FINISHED")
    return parent.info.run_id, outcomes


def headline_keys(outcomes: list[TrainOutcome]) -> list[str]:
    """The headline metrics some run has, then R@1 per caption slot (holistic comparisons)."""
    return compare_keys({k for o in outcomes for k in o.metrics})


def table(experiments: list[Experiment], outcomes: list[TrainOutcome]) -> str:
    keys = headline_keys(outcomes)
    width = max(len(k) for k in keys)
    cols = [f"{e.name} ({e.objective.name})" for e in experiments]
    lines = ["metric".ljust(width) + "".join(f"  {c:>22}" for c in cols)]
    for k in keys:
        lines.append(k.ljust(width) + "".join(f"  {o.metrics.get(k, float('nan')):>22.4f}" for o in outcomes))
    return "\n".join(lines)


def _log_summary(
    client: MlflowClient, parent: str, experiments: list[Experiment], outcomes: list[TrainOutcome]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for o in outcomes for k in o.metrics})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "comparison.csv"
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["run", "objective", "mlflow_run_id", *keys])
            for e, o in zip(experiments, outcomes, strict=True):
                writer.writerow([e.name, e.objective.name, o.mlflow_run_id, *(o.metrics.get(k, "") for k in keys)])
        client.log_artifact(parent, str(path))
        shown = [k for k in headline_keys(outcomes) if not is_train_metric(k)]
        fig, ax = plt.subplots(figsize=(1.6 * len(shown) + 2, 4))
        width = 0.8 / len(outcomes)
        for i, (e, o) in enumerate(zip(experiments, outcomes, strict=True)):
            ax.bar(
                [j + i * width for j in range(len(shown))],
                [o.metrics.get(k, 0) for k in shown],
                width,
                label=f"{e.name} ({e.objective.name})",
            )
        ax.set_xticks([j + width * (len(outcomes) - 1) / 2 for j in range(len(shown))], shown, rotation=20, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=8)
        ax.set_title("same-budget comparison (held-out)")
        fig.tight_layout()
        log_figure(client, parent, fig, "plots/comparison.png")
