"""Plots for the selection run's MLflow page: score histograms (pool vs selected) and score-vs-score scatters."""

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


def score_scatter(
    scores: dict[str, np.ndarray],
    selected: np.ndarray,
    noisy: np.ndarray,
    title: str,
    max_points: int = 20000,
    seed: int = 0,
) -> Figure:
    """One panel per pair of scores: selected against rejected samples, noisy captions (flag 1) as crosses.

    Where the scores disagree is what the panel shows: e.g. samples CLIPScore ranks high but negCLIPLoss
    low. At most `max_points` samples are drawn (a seeded uniform subsample of the pool); one panel for a
    single score (against itself) so the file always exists.
    """
    names = list(scores)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]] or [(names[0], names[0])]
    n = len(selected)
    show = np.random.default_rng(seed).choice(n, max_points, replace=False) if n > max_points else np.arange(n)
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4.0), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        x, y = scores[a][show], scores[b][show]
        sel, bad = selected[show], noisy[show] == 1
        for mask, colour, label in ((~sel, "tab:grey", "rejected"), (sel, "tab:blue", "selected")):
            ax.scatter(x[mask & ~bad], y[mask & ~bad], s=4, c=colour, alpha=0.5, label=label, marker=".")
            if bad.any():
                ax.scatter(x[mask & bad], y[mask & bad], s=10, c=colour, alpha=0.7, label=f"{label}, noisy", marker="x")
        ax.set(xlabel=a, ylabel=b)
        ax.legend(fontsize=7, markerscale=2)
    fig.suptitle(f"{title}: {len(show)} of {n} samples")
    fig.tight_layout()
    return fig
