"""Plotting helpers return figures; `log_figure` puts them on the MLflow run and frees them."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from mlflow.tracking import MlflowClient

from cliplab.select.plots import score_histograms
from cliplab.sweep.report import TrialRow, metric_vs_fields
from cliplab.tracking.figures import log_figure
from cliplab.tracking.mlflow import local_artifact_root


def test_figures_land_on_the_run_as_pngs(mlflow_uri: str) -> None:
    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.create_experiment("figures", local_artifact_root(mlflow_uri)))
    rng = np.random.default_rng(0)
    hist = score_histograms({"clip_score": rng.normal(size=50)}, rng.random(50) > 0.5, "t")
    log_figure(client, run.info.run_id, hist, "score_histograms.png")
    rows = [
        TrialRow("a", "TERMINATED", {"optim.lr": 1e-3}, 4, 0.5),
        TrialRow("b", "EARLY_STOPPED", {"optim.lr": 1e-2}, 2, 0.2),
    ]
    log_figure(client, run.info.run_id, metric_vs_fields(rows, ["optim.lr"], "loss", {"optim.lr"}), "plots/m.png")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"score_histograms.png", "plots"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/m.png"]
    assert plt.get_fignums() == []
