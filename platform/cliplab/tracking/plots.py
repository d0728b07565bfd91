"""The figures people look at in MLflow (matplotlib, headless); `RunLogger.figure` logs them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from cliplab.metrics import is_held_out


def loss_curves(series: dict[str, list[tuple[int, float]]], title: str) -> Figure:
    """One line per metric (step on x); eval metrics on a second panel if present."""
    train = {k: v for k, v in series.items() if v and not is_held_out(k)}
    evals = {k: v for k, v in series.items() if v and is_held_out(k)}
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    for name, points in train.items():
        steps, values = zip(*points, strict=True)
        axes[0][0].plot(steps, values, label=name)
    axes[0][0].set(xlabel="step", ylabel="loss", title=title)
    axes[0][0].legend(fontsize=8)
    if evals:
        for name, points in evals.items():
            steps, values = zip(*points, strict=True)
            axes[0][1].plot(steps, values, marker="o", label=name)
        axes[0][1].set(
            xlabel="step",
            ylabel="held-out metric",
            title="evaluation",
            ylim=(-1 if any(k.startswith("probe/") for k in evals) else 0, 1),
        )
        axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def branch_slot_heatmap(metrics: dict[str, float], slots: list[str], branches: int, title: str) -> Figure:
    """Which branch retrieves which caption slot: R@1 (image->text and text->image) per branch x slot."""
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.3 * len(slots) * 2, 1.5 + 0.5 * branches), squeeze=False)
    for ax, direction in zip(axes[0], ("i2t", "t2i"), strict=True):
        grid = np.array(
            [[metrics.get(f"branch{m}/{s}/{direction}_R1", np.nan) for s in slots] for m in range(branches)]
        )
        ax.imshow(grid, vmin=0, vmax=max(np.nanmax(grid), 1e-6) if np.isfinite(grid).any() else 1, cmap="viridis")
        ax.set(
            xticks=range(len(slots)),
            xticklabels=slots,
            yticks=range(branches),
            yticklabels=[f"branch {m}" for m in range(branches)],
            title=f"{direction} R@1",
        )
        for (m, c), value in np.ndenumerate(grid):
            ax.text(c, m, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def calibration_plot(points: np.ndarray, title: str) -> Figure:
    """Mean +- std of the distance per crop scale, and per removed-object share."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, col, label in (
        (axes[0], 1, "misalignment 1 - crop area (augmentation)"),
        (axes[1], 2, "share of caption objects removed (ground truth)"),
    ):
        keep = ~np.isnan(points[:, col])
        xs = np.unique(np.round(points[keep, col], 2))
        means = [points[keep][np.round(points[keep, col], 2) == x, 0].mean() for x in xs]
        stds = [points[keep][np.round(points[keep, col], 2) == x, 0].std() for x in xs]
        ax.scatter(points[keep, col], points[keep, 0], s=4, alpha=0.15, color="grey")
        ax.errorbar(xs, means, yerr=stds, marker="o", color="C0", capsize=3)
        ax.set(xlabel=label, ylabel="image-caption distance ||z - u||^2")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
