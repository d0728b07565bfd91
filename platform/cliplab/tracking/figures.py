"""Matplotlib figures to MLflow: one call that logs a figure as a run artifact and frees it.

`MlflowClient.log_figure` renders the figure straight into the artifact store, so plotting helpers return
a Figure and never write (or clean up) temporary PNG files of their own.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient


def log_figure(client: MlflowClient, run_id: str, fig: Figure, artifact_file: str, dpi: int = 110) -> None:
    """Log `fig` on the run as `artifact_file` (e.g. `plots/comparison.png`), then close it."""
    try:
        client.log_figure(run_id, fig, artifact_file, save_kwargs={"dpi": dpi})
    finally:
        plt.close(fig)
