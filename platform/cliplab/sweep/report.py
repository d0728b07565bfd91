"""What a sweep leaves behind: the live trial table, the results table (CSV), plots, the best trial's config."""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from ray import tune

log = logging.getLogger("cliplab.sweep")


@dataclass
class TrialRow:
    trial_id: str
    status: str  # TERMINATED | EARLY_STOPPED | ERROR | RUNNING | PENDING
    point: dict[str, Any]
    step: int | None = None
    metric: float | None = None
    mlflow_run_id: str | None = None
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def trial_table(rows: list[TrialRow], fields: list[str], metric: str) -> str:
    """Plain-text table: trial, status, step, metric, each swept field."""
    header = ["trial", "status", "step", metric, *fields]
    body = [[r.trial_id, r.status, _fmt(r.step), _fmt(r.metric), *(_fmt(r.point.get(f)) for f in fields)] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


class ProgressTable(tune.Callback):
    """Log the trial table when a trial starts, stops or fails, and at most every `every_s` on new results."""

    def __init__(self, fields: list[str], metric: str, every_s: float = 30.0):
        self.fields, self.metric, self.every_s = fields, metric, every_s
        self.last = 0.0

    def _show(self, trials: list[Any], force: bool) -> None:
        if not force and time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        rows = [
            TrialRow(
                t.trial_id,
                t.status,
                t.config,
                (t.last_result or {}).get("step"),
                (t.last_result or {}).get(self.metric),
            )
            for t in trials
        ]
        log.info("sweep progress\n%s", trial_table(rows, self.fields, self.metric))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trials, force=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._show(trials, force=False)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._show(trials, force=True)


def write_csv(rows: list[TrialRow], fields: list[str], metric: str, path: Path) -> Path:
    extras = sorted({k for r in rows for k in r.extra})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial_id", "status", "mlflow_run_id", "step", metric, *fields, *extras, "error"])
        for r in rows:
            writer.writerow(
                [
                    r.trial_id,
                    r.status,
                    r.mlflow_run_id,
                    r.step,
                    r.metric,
                    *(r.point.get(f) for f in fields),
                    *(r.extra.get(k) for k in extras),
                    r.error or "",
                ]
            )
    return path


def _numeric(values: list[Any]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def metric_vs_fields(rows: list[TrialRow], fields: list[str], metric: str, log_scale: set[str]) -> Figure:
    """One panel per swept field: the metric of every trial that reported it, early-stopped ones hollow."""
    fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 3.5), squeeze=False)
    done = [r for r in rows if r.metric is not None]
    for ax, name in zip(axes[0], fields, strict=True):
        xs = [r.point.get(name) for r in done]
        numeric = _numeric(xs)
        positions = numeric if numeric is not None else [sorted(set(map(str, xs))).index(str(x)) for x in xs]
        for r, x in zip(done, positions, strict=True):
            full = r.status == "TERMINATED"
            ax.scatter([x], [r.metric], s=40, facecolors="C0" if full else "none", edgecolors="C0")
        if numeric is None:
            labels = sorted(set(map(str, xs)))
            ax.set_xticks(range(len(labels)), labels)
        if name in log_scale:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log range overlap
        ax.set(xlabel=name, ylabel=metric)
    fig.suptitle(f"{metric} per trial (hollow: stopped early by the scheduler)", fontsize=10)
    fig.tight_layout()
    return fig


def parallel_coordinates(rows: list[TrialRow], fields: list[str], metric: str, log_scale: set[str]) -> Figure:
    """Each trial a line across the swept fields (scaled to [0, 1]) and the metric, coloured by the metric."""
    done = [r for r in rows if r.metric is not None]
    axes_names = [*fields, metric]
    columns = []
    for name in axes_names:
        raw = [r.metric if name == metric else r.point.get(name) for r in done]
        numeric = _numeric(raw)
        if numeric is None:
            labels = sorted(set(map(str, raw)))
            numeric = [labels.index(str(v)) for v in raw]
        if name in log_scale:
            numeric = [math.log10(v) for v in numeric]
        low, high = min(numeric, default=0.0), max(numeric, default=1.0)
        columns.append([(v - low) / (high - low) if high > low else 0.5 for v in numeric])
    fig, ax = plt.subplots(figsize=(1.8 * len(axes_names) + 2, 4))
    cmap = plt.get_cmap("viridis")
    metric_scaled = columns[-1] if columns else []
    for i, r in enumerate(done):
        ax.plot(
            range(len(axes_names)),
            [c[i] for c in columns],
            color=cmap(metric_scaled[i]),
            linestyle="-" if r.status == "TERMINATED" else "--",
            marker="o",
        )
    ax.set_xticks(range(len(axes_names)), axes_names, rotation=15, fontsize=8)
    ax.set_yticks([0, 1], ["low", "high"])
    ax.set_title(f"parallel coordinates, colour = {metric} (dashed: stopped early)", fontsize=10)
    fig.tight_layout()
    return fig
