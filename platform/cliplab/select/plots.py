"""Score histograms for the selection run's MLflow page: the whole pool against the selected subset."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def score_histograms(scores: dict[str, np.ndarray], selected: np.ndarray, title: str) -> Figure:
    """One panel per score: histogram of the pool and of the selected samples (boolean mask `selected`)."""
    fig, axes = plt.subplots(1, len(scores), figsize=(4.5 * len(scores), 3.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], scores.items(), strict=True):
        bins = np.histogram_bin_edges(values, bins=50)
        ax.hist(values, bins=bins, alpha=0.5, label=f"pool ({len(values)})")
        ax.hist(values[selected], bins=bins, alpha=0.7, label=f"selected ({int(selected.sum())})")
        ax.set(xlabel=name, ylabel="samples")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
