"""PNG plots that people look at in MLflow (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def loss_curves(series: dict[str, list[tuple[int, float]]], path: Path, title: str) -> Path:
    """One line per metric (step on x); eval metrics on a second panel if present."""
    held_out = ("zeroshot/", "retrieval/", "probe/")
    train = {k: v for k, v in series.items() if v and not k.startswith(held_out)}
    evals = {k: v for k, v in series.items() if v and k.startswith(held_out)}
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
        axes[0][1].set(xlabel="step", ylabel="held-out metric", title="evaluation", ylim=(-1 if any(
            k.startswith("probe/") for k in evals) else 0, 1))
        axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
