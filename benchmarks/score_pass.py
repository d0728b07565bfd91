"""One scoring pass, measured: a fresh local Ray and the selection job's own Ray Data scoring (score_tasks.py).

The pool is random unit embeddings written as the embedding pass leaves them (one parquet file and completion
marker per shard, `embed.write_output`), and so is the NormSim target. The pass is what `cliplab select` runs for
its stage 3: `pool.index_pool`, then `score_tasks.score_pool` (CLIPScore and NormSim_inf in an actor pool,
negCLIPLoss one window of shards at a time per partition). Run it in a fresh process per pool size: the
driver's and the workers' peaks are then that size's alone.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from cliplab.runtime import start_local_ray
from cliplab.select.config import NegClipConfig, ScoreConfig, ScoresConfig
from cliplab.select.embed import write_output
from cliplab.select.pool import index_pool
from cliplab.select.score_tasks import score_pool
from worker_peaks import WorkerPeaks


def write_embedded(folder: Path, n: int, dim: int, per_shard: int, seed: int) -> list[str]:
    """n random unit image/text embedding pairs as shard outputs of `per_shard` rows; the shard URLs (made up)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    urls = []
    for s, start in enumerate(range(0, n, per_shard)):
        rows = min(per_shard, n - start)
        url = f"file:///bench/{s:05d}.tar"
        emb = rng.standard_normal((2, rows, dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=2, keepdims=True)
        part = {
            "uid": np.array([f"{start + i:032x}" for i in range(rows)], dtype=object),
            "key": np.array([f"{i:06d}" for i in range(rows)], dtype=object),
            "shard": np.array([url] * rows, dtype=object),
            "caption": np.array([""] * rows, dtype=object),
            "noisy": np.full(rows, -1, dtype=np.int8),
            "image_emb": emb[0].astype(np.float16),
            "text_emb": emb[1].astype(np.float16),
        }
        write_output(str(folder), url, [part], 0)
        urls.append(url)
    return urls


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def score_one_size(folder: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Score the pool and target written under `folder` on a new local Ray: seconds per pass, samples/s, peaks."""
    root = Path(folder)
    start_local_ray(num_cpus=settings["cpus"], include_dashboard=False, log_to_driver=False)
    try:
        pool = index_pool(str(root / "pool"), settings["pool_urls"], "pool")
        target = index_pool(str(root / "target"), settings["target_urls"], "target")
        negclip = NegClipConfig(
            batch_size=settings["batch"], repeats=settings["repeats"], window_batches=settings["window_batches"]
        )
        scores = ScoresConfig(tau=0.01, negclip=negclip, normsim_p=["inf"])
        res = ScoreConfig(actors=settings["actors"], cpus_per_actor=1.0, cpus_per_read=0.5, gpus_per_actor=0)
        driver_before, load_before = _maxrss_mib(), os.getloadavg()[0]
        with WorkerPeaks() as peaks:
            t0 = time.perf_counter()
            result = score_pool(pool, target, scores, 0.01, res)
            seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    n = len(pool)
    return {
        "samples": n,
        "seconds": seconds,
        "pass_s": result.seconds,
        "samples_per_s": {k: n / v for k, v in result.seconds.items()},
        "load_1min": [load_before, os.getloadavg()[0]],
        "driver_rss_before_mib": driver_before,
        "driver_peak_rss_mib": _maxrss_mib(),
        "worker_peak_rss_mib": max(peaks.by_role().values(), default=0.0),
        "role_peak_rss_mib": peaks.by_role(),
        "workers": [
            {"pid": w.pid, "role": w.role(), "peak_rss_mib": w.peak_mib, "titles": sorted(w.titles)}
            for w in peaks.workers.values()
        ],
    }
