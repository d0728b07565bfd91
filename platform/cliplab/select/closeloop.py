"""Closing the loop: train the same budget on the negCLIPLoss, CLIPScore and random subsets of a selection.

From a selection job's scores.parquet, three subsets of equal size k = floor(f N) of the N-sample pool:
the top k by negCLIPLoss, the top k by CLIPScore (`recipes.top_k`: ties to the earlier pool position) and
a seeded random k (`evaluation.kept_mask`). Each is resharded byte for byte (`reshard.reshard`) into its own
prefix and trained with the same experiment (steps, batch, model, seed, held-out val shards; only `name`
and `data.train_shards` differ) by cliplab's normal training path. The three runs are siblings in the
experiment's MLflow experiment, tagged `cliplab.selection_run` and `cliplab.subset`, with the param
`subset.size`; their held-out zero-shot and retrieval numbers make one table, logged to the selection run
as `closed_loop.md`.
"""

from __future__ import annotations

import copy
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from cliplab.config import Experiment, validate_tree
from cliplab.data.shards import filesystem
from cliplab.errors import ConfigError
from cliplab.select import uids as U
from cliplab.select.evaluation import kept_mask, standard_methods
from cliplab.select.reshard import reshard
from cliplab.tracking.mlflow import resolve_tracking_uri
from cliplab.train.trainer import run_training

log = logging.getLogger("cliplab.select")
METHODS = ("negclip", "clipscore", "random")
SELECTION_RUN_TAG = "cliplab.selection_run"
SUBSET_METHOD_TAG = "cliplab.subset"
ARTIFACT = "closed_loop.md"


@dataclass(frozen=True)
class LoopRun:
    """One subset's training run: its method, size, shards, MLflow run and final metrics."""

    method: str
    fraction: float
    size: int
    shards: str
    run_id: str
    run_name: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class ClosedLoop:
    """The three sibling runs (in METHODS order) and the printed table."""

    runs: list[LoopRun]
    table: str


def read_scores(url: str) -> pa.Table:
    """A selection job's scores.parquet (uid, key, shard, every score), the pool in pool order."""
    fs, path = filesystem(url)
    return pq.read_table(io.BytesIO(fs.cat_file(path)))


def subset_indices(scores: pa.Table, fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Sorted pool indices of each METHODS subset, all floor(fraction N): top by each score, or seeded random."""
    n = len(scores)
    if not 0 < fraction <= 1 or math.floor(fraction * n) == 0:
        raise ConfigError(f"closed loop: fraction must keep at least one of the {n} pool samples, got {fraction}")
    missing = [c for c in ("negclip", "clipscore") if c not in scores.column_names]
    if missing:
        raise ConfigError(f"closed loop: scores have no {missing} column (negCLIPLoss needs scores.negclip set)")
    columns = {c: scores.column(c).to_numpy() for c in ("negclip", "clipscore")}
    methods = {m.name: m for m in standard_methods([fraction], normsim=False)}
    return {name: np.flatnonzero(kept_mask(methods[name], columns, n, seed)) for name in METHODS}


def check_base(base: dict[str, Any]) -> Experiment:
    """The base experiment, validated, with the held-out evaluation the comparison reads."""
    exp = validate_tree(copy.deepcopy(base), "closed loop base experiment")
    if not exp.data.val_shards:
        raise ConfigError("closed loop base experiment: data.val_shards: required (the runs are compared held out)")
    if not exp.eval.every_steps:
        raise ConfigError("closed loop base experiment: eval.every_steps: required (no held-out evaluation otherwise)")
    return exp


def subset_experiment(base: dict[str, Any], method: str, shards: str) -> Experiment:
    """The base experiment on one subset's shards, named `<name>-<method>` (its runs and registered model)."""
    tree = copy.deepcopy(base)
    tree["name"] = f"{tree['name']}-{method}"
    tree["data"] = {**tree["data"], "train_shards": shards}
    return validate_tree(tree, f"closed loop experiment ({method})")


def shard_size(size: int, exp: Experiment, cap: int) -> int:
    """Samples per new shard: at most `cap`, and small enough that every data reader gets a shard."""
    readers = exp.scaling.num_workers * max(1, exp.data.num_workers)
    return max(1, min(cap, math.ceil(size / readers)))


def close_loop(
    scores_url: str,
    selection_run: str,
    fraction: float,
    base: dict[str, Any],
    prefix: str,
    seed: int = 0,
    samples_per_shard: int = 10000,
) -> ClosedLoop:
    """Reshard and train the three equal-size subsets as sibling runs; log and return the table."""
    exp = check_base(base)
    uri = resolve_tracking_uri(exp)
    client = MlflowClient(uri)
    try:
        client.get_run(selection_run)
    except Exception as exc:
        raise ConfigError(f"closed loop: selection_run: no run {selection_run} at {uri} ({exc})") from None
    scores = read_scores(scores_url)
    uid = np.array(scores.column("uid").to_pylist(), dtype=object)
    runs = []
    for method, idx in subset_indices(scores, fraction, seed).items():
        out = f"{prefix.rstrip('/')}/{method}"
        shards = reshard(scores, U.to_pairs(uid[idx]), out, shard_size(len(idx), exp, samples_per_shard))
        log.info("closed loop: %s subset, %d samples in %d shards at %s", method, len(idx), len(shards.urls), out)
        outcome = run_training(
            subset_experiment(base, method, shards.spec),
            tags={SELECTION_RUN_TAG: selection_run, SUBSET_METHOD_TAG: method},
            params={"subset.size": str(len(idx)), "subset.fraction": str(fraction), "subset.seed": str(seed)},
        )
        runs.append(
            LoopRun(method, fraction, len(idx), shards.spec, outcome.mlflow_run_id, outcome.run_name, outcome.metrics)
        )
    table = loop_table(runs, exp)
    client.log_text(selection_run, report(runs, table), ARTIFACT)
    return ClosedLoop(runs, table)


def held_out_keys(runs: list[LoopRun]) -> list[str]:
    """The table's metrics: every zero-shot top-1, then image-to-text and text-to-image R@1, that all runs have."""
    have = set.intersection(*(set(r.metrics) for r in runs))
    zeroshot = sorted(k for k in have if k.startswith("zeroshot/") and k.endswith("/top1"))
    return zeroshot + [k for k in ("retrieval/i2t_R1", "retrieval/t2i_R1") if k in have]


def loop_table(runs: list[LoopRun], exp: Experiment) -> str:
    """The runs as an aligned text table (as `evaluation.format_table`), with the shared budget underneath."""
    cols = ["method", "kept", "size", *held_out_keys(runs)]
    width = {c: max(len(c), 20 if c == "method" else 8) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) if c == "method" else c.rjust(width[c]) for c in cols)]
    for r in runs:
        cells = [r.method.ljust(width["method"]), f"{r.fraction:.3f}".rjust(width["kept"])]
        cells.append(str(r.size).rjust(width["size"]))
        cells += [f"{r.metrics[c]:.3f}".rjust(width[c]) for c in cols[3:]]
        lines.append("  ".join(cells))
    lines.append(
        f"each run: {exp.train.steps} steps x {exp.data.batch_size} x {exp.scaling.num_workers} workers "
        f"(seed {exp.train.seed}); held out: {exp.data.val_shards}"
    )
    return "\n".join(lines)


def report(runs: list[LoopRun], table: str) -> str:
    """The selection run's closed_loop.md: the table and each method's run."""
    lines = ["# Closed loop: the same training budget on each subset", "", "```", table, "```", ""]
    lines += [f"- {r.method}: run `{r.run_name}` ({r.run_id}), shards `{r.shards}`" for r in runs]
    return "\n".join(lines) + "\n"
