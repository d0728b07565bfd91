"""The selection job: embed the pool (and target) -> score -> recipe -> subset file, scores, MLflow run.

Outputs under `output`:
- `embeddings/pool/`, `embeddings/target/`: the per-shard embedding parquet files (kept: a rerun of
  the same config resumes from them, and other recipes can be tried on them without re-embedding);
- `subset.npy`: the selected uids in DataComp's format (uids.py);
- `manifest.json`: pool spec and counts, teacher, tau, K, |B|, seed, the recipe with the samples kept
  by each step, and the URI of every output (manifest.py);
- `shards/` (with `reshard.enabled`): the selected samples as new WebDataset shards (reshard.py);
- `scores.parquet`: every pool sample's uid, key, shard, `noisy` flag, each score, and one boolean
  column per recipe step (`kept_1`, ...) plus `selected` (the final subset after set algebra).
The MLflow run (experiment `tracking.experiment`, default cliplab-select) gets the teacher, tau, K,
|B| (requested and used), seed, fractions and pool size as params; pool size, samples kept after
each step, skipped samples and unreadable shards as metrics; seconds and samples/s per stage
(`time/<stage>_s`, `speed/<stage>_samples_per_s`: embedding the pool and the target (samples
embedded by this pass; absent when every shard was resumed), `load` (the shards' markers and the
metadata), `score_clipscore_normsim` and `score_negclip` (the two scoring passes), the recipe);
histograms of every score and a score-vs-score scatter (selected against rejected, noisy captions
marked) as PNGs; `subset.npy`, `manifest.json` and the resolved `selection.yaml` as artifacts;
and, when every pool sample has a json `noisy` flag (SynthScenes), precision and recall of
*rejecting* noisy samples.

Scoring (spec eqs. 1, 3, 4) runs on Ray Data (score_tasks.py), on the cluster's workers and GPUs:
the embeddings are read from the parquet outputs by the workers, never by the driver, which gets
only per-sample scalars (row index, scores) and the metadata (uid, key, shard, noisy) for the global
selection, so the job runs unchanged on a laptop's local Ray and on a KubeRay cluster.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from cliplab.data.shards import expand_urls, filesystem
from cliplab.select import uids as U
from cliplab.select.config import SelectConfig
from cliplab.select.dedup import dedup_step
from cliplab.select.embed import EmbedStats, embed_shards
from cliplab.select.image_folder import image_chunks
from cliplab.select.manifest import build_manifest, write_manifest
from cliplab.select.plots import score_histograms, score_scatter
from cliplab.select.pool import PoolIndex, index_pool, read_meta
from cliplab.select.recipes import Filter, Step, apply_chain, combine
from cliplab.select.reshard import reshard
from cliplab.select.score_tasks import score_pool
from cliplab.select.teacher import TeacherInfo, inspect, resolve
from cliplab.tracking.figures import log_figure
from cliplab.tracking.mlflow import RunLogger, experiment_id, git_commit, resolve_tracking_uri

log = logging.getLogger("cliplab.select")
SUBSET_TAG = "cliplab.subset_uri"
RESHARD_TAG = "cliplab.reshard_shards"  # brace spec of the resharded subset, for data.train_shards


@dataclass
class SelectOutcome:
    """Where the results are, and the headline numbers."""

    run_id: str
    subset: str
    scores: str
    pool_size: int
    kept: list[int]
    selected: int
    metrics: dict[str, float]


def stage_speed(metrics: dict[str, float], stage: str, samples: int, seconds: float) -> None:
    """Record a stage's wall time and, when it processed samples, its samples/s."""
    metrics[f"time/{stage}_s"] = seconds
    if samples:
        metrics[f"speed/{stage}_samples_per_s"] = samples / max(seconds, 1e-9)


def compute_scores(
    cfg: SelectConfig, pool: PoolIndex, target: PoolIndex | None, tau: float
) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, float]]:
    """Every configured score of the pool on Ray Data (score_tasks.py), the batching used, time per pass."""
    n = len(pool)
    result = score_pool(pool, target, cfg.scores, tau, cfg.score)
    speed: dict[str, float] = {}
    for stage, seconds in result.seconds.items():
        stage_speed(speed, stage, n, seconds)
    used: dict[str, Any] = {}
    nc = cfg.scores.negclip
    if nc is not None and result.batches is not None:
        used["negclip.batch_size_used"] = result.batches.batch_size
        used["negclip.window_rows"] = result.batches.window_rows
        log.info(
            "select: negCLIPLoss, K=%d, |B|=%d (asked %d), windows of >= %d rows, %.1fs",
            nc.repeats,
            result.batches.batch_size,
            nc.batch_size,
            min(result.batches.window_rows, n),
            speed["time/score_negclip_s"],
        )
        if result.batches.batch_size < nc.batch_size:
            log.warning("select: pool of %d < |B| = %d: one batch, the whole pool (deterministic)", n, nc.batch_size)
    return result.scores, used, speed


def noisy_metrics(noisy: np.ndarray, selected: np.ndarray) -> dict[str, float]:
    """Precision and recall of rejecting the samples flagged `noisy` (only when every sample has the flag)."""
    if len(noisy) == 0 or (noisy < 0).any():
        return {}
    bad, rejected = noisy == 1, ~selected
    caught = float((bad & rejected).sum())
    return {
        "noisy/fraction": float(bad.mean()),
        "noisy/reject_precision": caught / max(1, int(rejected.sum())),
        "noisy/reject_recall": caught / max(1, int(bad.sum())),
    }


def static_params(cfg: SelectConfig, teacher: str, tau: float, tau_from: str) -> dict[str, Any]:
    """The run's params known before any work: teacher, tau, K, |B| asked, seed, p, recipe fractions."""
    nc = cfg.scores.negclip
    out: dict[str, Any] = {
        "teacher": teacher,
        "tau": tau,
        "tau_source": tau_from,
        "pool.shards": cfg.pool.shards,
        "target": (cfg.target.shards or cfg.target.images) if cfg.target else None,
        "normsim_p": cfg.scores.normsim_p,
        "recipe": params_line(cfg),
    }
    if nc is not None:
        out.update(
            {
                "negclip.K": nc.repeats,
                "negclip.batch_size": nc.batch_size,
                "negclip.seed": nc.seed,
                "negclip.window_batches": nc.window_batches,
            }
        )
    for i, step in enumerate(cfg.recipe.steps, 1):
        if step.dedup is not None:
            out.update({f"step{i}.dedup.{k}": v for k, v in step.dedup.model_dump().items()})
            continue
        out[f"step{i}.score"] = step.score
        out[f"step{i}.{'fraction' if step.fraction else 'threshold'}"] = step.fraction or step.threshold
    return out


def _log_params(run_logger: RunLogger, params: dict[str, Any]) -> None:
    batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
    run_logger.client.log_batch(run_logger.run_id, params=batch)


def _write_scores(
    url: str, meta: pa.Table, scores: dict[str, np.ndarray], kept: list[np.ndarray], selected: np.ndarray
) -> None:
    n = len(meta)
    cols: dict[str, Any] = {k: meta.column(k) for k in ("uid", "key", "shard", "noisy")}
    cols.update({k: pa.array(v) for k, v in scores.items()})
    for i, idx in enumerate(kept, 1):
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        cols[f"kept_{i}"] = pa.array(mask)
    cols["selected"] = pa.array(selected)
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    fs, path = filesystem(url)
    fs.pipe_file(path, buf.getvalue())


def run_selection(cfg: SelectConfig) -> SelectOutcome:
    """Run the whole job; the MLflow run is marked FAILED if any stage raises."""
    uri = resolve_tracking_uri(cfg)  # reads only cfg.tracking, the same fields as an experiment's
    source = resolve(cfg.teacher, uri)
    log.info("select: stage 1/5 teacher %s", source.describe())
    info = inspect(source)
    tau, tau_from = (cfg.scores.tau, "config") if cfg.scores.tau else (info.tau, "teacher")
    client = MlflowClient(uri)
    tags = {
        "cliplab.kind": "select",
        "cliplab.selection": cfg.name,
        "teacher": source.describe(),
        "git_commit": git_commit(),
    }
    run = client.create_run(experiment_id(client, cfg, uri), run_name=cfg.tracking.run_name or cfg.name, tags=tags)
    run_logger = RunLogger(uri, run.info.run_id)
    try:
        _log_params(run_logger, static_params(cfg, source.describe(), tau, tau_from))
        outcome = _stages(cfg, info, tau, tau_from, source.describe(), run_logger)
    except BaseException:
        run_logger.finish("FAILED")
        raise
    run_logger.finish()
    log.info("select: MLflow run %s at %s", outcome.run_id, uri)
    return outcome


def _embed(
    cfg: SelectConfig, info: TeacherInfo, target_urls: list[str], files: dict[str, list[str]] | None
) -> tuple[EmbedStats, dict[str, float]]:
    """Embed the pool and the target (resuming complete shards); the pool's stats and the pass's metrics."""
    out = cfg.output.rstrip("/")
    pool_urls = expand_urls(cfg.pool.shards)
    log.info("select: stage 2/5 embedding %d pool shards", len(pool_urls))
    t0 = time.perf_counter()
    pool_stats = embed_shards(pool_urls, f"{out}/embeddings/pool", info, cfg.embed, cfg.pool.caption_key)
    metrics = pool_stats.metrics("pool")
    stage_speed(metrics, "embed_pool", pool_stats.embedded, time.perf_counter() - t0)
    if target_urls:
        kind = "image-folder chunks" if files else "shards"
        log.info("select: stage 2/5 embedding %d target %s", len(target_urls), kind)
        t0 = time.perf_counter()
        stats = embed_shards(target_urls, f"{out}/embeddings/target", info, cfg.embed, "txt", True, "target", files)
        metrics.update(stats.metrics("target"))
        stage_speed(metrics, "embed_target", stats.embedded, time.perf_counter() - t0)
    return pool_stats, metrics


def _target_sources(cfg: SelectConfig) -> tuple[list[str], dict[str, list[str]] | None]:
    """The target's shard URLs, or its image folder's chunk names with their files; nothing without a target."""
    if cfg.target is None:
        return [], None
    if cfg.target.images is not None:
        chunks = image_chunks(cfg.target.images, cfg.target.files_per_task)
        return list(chunks), chunks
    return expand_urls(cfg.target.shards), None


def _stages(
    cfg: SelectConfig, info: TeacherInfo, tau: float, tau_from: str, teacher: str, run_logger: RunLogger
) -> SelectOutcome:
    out = cfg.output.rstrip("/")
    pool_urls = expand_urls(cfg.pool.shards)
    target_urls, files = _target_sources(cfg)
    pool_stats, metrics = _embed(cfg, info, target_urls, files)
    t0 = time.perf_counter()
    pool = index_pool(f"{out}/embeddings/pool", pool_urls, "pool")
    target = index_pool(f"{out}/embeddings/target", target_urls, "target") if target_urls else None
    meta = read_meta(pool)
    n = len(pool)
    stage_speed(metrics, "load", n, time.perf_counter() - t0)
    log.info("select: stage 3/5 scoring %d samples on Ray Data (tau %.4g)", n, tau)
    scores, used, speed = compute_scores(cfg, pool, target, tau)
    metrics.update(speed)
    _log_params(run_logger, {"pool_size": n, **used})
    kept, chosen, selected = _recipe(cfg, pool, scores, meta, metrics)
    log.info("select: stage 5/5 writing %s/subset.npy, scores.parquet and manifest.json", out)
    _write_scores(f"{out}/scores.parquet", meta, scores, kept, selected)
    reshard_spec = _reshard(cfg, meta, chosen, metrics, run_logger) if cfg.reshard.enabled else None
    outputs = {
        "subset": f"{out}/subset.npy",
        "scores": f"{out}/scores.parquet",
        "manifest": f"{out}/manifest.json",
        "embeddings_pool": f"{out}/embeddings/pool",
        "embeddings_target": f"{out}/embeddings/target" if target_urls else None,
        "shards": reshard_spec,
    }
    pool_counts = {
        "shard_count": len(pool_urls),
        "samples": n,
        "skipped_samples": pool_stats.skipped_samples,
        "unreadable_shards": pool_stats.unreadable,
    }
    steps = [
        {**s.model_dump(mode="json", exclude_none=True), "kept": len(k)}
        for s, k in zip(cfg.recipe.steps, kept, strict=True)
    ]
    manifest = build_manifest(
        cfg, run_logger.run_id, teacher, tau, tau_from, pool_counts, used, steps, len(chosen), outputs
    )
    _write_outputs(cfg, run_logger, outputs, U.to_hex(chosen), manifest)
    fig = score_histograms(scores, selected, cfg.name)
    log_figure(run_logger.client, run_logger.run_id, fig, "score_histograms.png", dpi=100)
    fig = score_scatter(scores, selected, meta.column("noisy").to_numpy(), cfg.name)
    log_figure(run_logger.client, run_logger.run_id, fig, "score_scatter.png", dpi=100)
    run_logger.metrics(metrics, step=0)
    run_logger.tags({SUBSET_TAG: outputs["subset"]})
    log.info(
        "select: %d of %d samples selected; %s",
        len(chosen),
        n,
        ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith("noisy/")),
    )
    return SelectOutcome(
        run_logger.run_id, outputs["subset"], outputs["scores"], n, [len(k) for k in kept], len(chosen), metrics
    )


def _write_outputs(
    cfg: SelectConfig, run_logger: RunLogger, outputs: dict[str, Any], uids: list[str], manifest: dict[str, Any]
) -> None:
    """subset.npy and manifest.json, written once each to the output location and logged to the run beside
    the selection config."""
    with tempfile.TemporaryDirectory(prefix="cliplab-select-") as work:
        files = {"subset": Path(work) / "subset.npy", "manifest": Path(work) / "manifest.json"}
        files["subset"].write_bytes(U.save_subset(outputs["subset"], uids))
        files["manifest"].write_bytes(write_manifest(outputs["manifest"], manifest))
        config = Path(work) / "selection.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        for path in (files["manifest"], files["subset"], config):
            run_logger.artifact(path)


def recipe_chain(cfg: SelectConfig, pool: PoolIndex, scores: dict[str, np.ndarray]) -> list[Step | Filter]:
    """The recipe's steps as recipes.apply_chain takes them: score steps, and dedup steps bound to the pool."""
    chain: list[Step | Filter] = []
    for s in cfg.recipe.steps:
        if s.dedup is None:
            chain.append(Step(s.score, s.fraction, s.threshold))
        else:
            chain.append(partial(dedup_step, pool, score=scores[s.dedup.rank_by], cfg=s.dedup, res=cfg.score))
    return chain


def _recipe(
    cfg: SelectConfig, pool: PoolIndex, scores: dict[str, np.ndarray], meta: pa.Table, metrics: dict[str, float]
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Apply the chain and the set algebra: kept indices per step, the chosen uids, the per-sample selected flag."""
    n = len(pool)
    log.info("select: stage 4/5 recipe %s", params_line(cfg))
    t0 = time.perf_counter()
    kept = apply_chain(scores, recipe_chain(cfg, pool, scores))
    stage_speed(metrics, "recipe", n, time.perf_counter() - t0)
    uid = np.array(meta.column("uid").to_pylist(), dtype=object)
    chosen = U.to_pairs(uid[kept[-1]])
    for i, (step, idx) in enumerate(zip(cfg.recipe.steps, kept, strict=True), 1):
        metrics[f"select/kept_{i}_{step.label}"] = len(idx)
        log.info("select: step %d (%s): %d of %d kept", i, step.label, len(idx), n)
    for c in cfg.recipe.combine:
        chosen = combine(chosen, c.op, U.load_subset(c.subset))
        log.info("select: %s with %s -> %d uids", c.op, c.subset, len(chosen))
    metrics["pool/size"] = n
    chosen_hex = set(U.to_hex(chosen))
    selected = np.array([u in chosen_hex for u in uid], dtype=bool)
    metrics["select/selected"] = len(chosen)
    metrics.update(noisy_metrics(meta.column("noisy").to_numpy(), selected))
    return kept, chosen, selected


def _reshard(
    cfg: SelectConfig, meta: pa.Table, chosen: np.ndarray, metrics: dict[str, float], run_logger: RunLogger
) -> str:
    """Write the selected samples as new shards; returns their brace spec (also the run's reshard tag)."""
    out = cfg.output.rstrip("/")
    log.info("select: resharding %d uids into %s/shards", len(chosen), out)
    result = reshard(meta, chosen, f"{out}/shards", cfg.reshard.samples_per_shard, cfg.embed.cpus_per_read)
    metrics["reshard/shards"], metrics["reshard/samples"] = len(result.urls), result.samples
    metrics["reshard/missing_uids"] = result.missing_uids
    run_logger.tags({RESHARD_TAG: result.spec})
    log.info("select: %d samples in %d new shards: %s", result.samples, len(result.urls), result.spec)
    return result.spec


def params_line(cfg: SelectConfig) -> str:
    """The recipe as one readable line, e.g. `negclip top 0.3 -> normsim_inf top 0.2 (of the pool)`."""
    steps = [s.describe() for s in cfg.recipe.steps]
    return " -> ".join(steps) + " (fractions of the pool)" + "".join(f", {c.op} {c.subset}" for c in cfg.recipe.combine)
