"""One embedding pass, measured: a fresh local Ray, the selection job's own teacher load and Ray Data pass.

It calls what `cliplab select` calls for its stage 2 (`run._stages`): `teacher.inspect` once on the driver,
then `embed.embed_shards` over the pool's shards into `out` (one read task per shard, decode + resize on CPU,
the teacher in an ActorPoolStrategy pool, a parquet file per shard); MLflow plays no part in the pass and is
left out. Run it in a fresh process per pool size: the driver's peak RSS (`ru_maxrss`) and the workers' are then
that size's alone.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import ray

from cliplab.runtime import start_local_ray
from cliplab.select.config import EmbedConfig
from cliplab.select.embed import embed_shards
from cliplab.select.teacher import TeacherSource, inspect
from worker_peaks import WorkerPeaks


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def embed_one_size(urls: list[str], teacher: Path, out: str, embed: dict[str, Any], num_cpus: int) -> dict[str, Any]:
    """Embed the pool `urls` into `out` on a new local Ray of `num_cpus`: counts, seconds, samples/s, peaks."""
    start_local_ray(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        info = inspect(TeacherSource(export=str(teacher)))
        cfg = EmbedConfig(**embed)
        driver_before, load_before = _maxrss_mib(), os.getloadavg()[0]
        with WorkerPeaks() as peaks:
            t0 = time.perf_counter()
            stats = embed_shards(urls, out, info, cfg)
            seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    roles = peaks.by_role()
    return {
        "shards": stats.shards,
        "shards_unreadable": len(stats.unreadable),
        "samples": stats.samples,
        "embedded": stats.embedded,
        "skipped_samples": stats.skipped_samples,
        "seconds": seconds,
        "samples_per_s": stats.embedded / seconds,
        "load_1min": [load_before, os.getloadavg()[0]],  # machine load around the pass (skews samples/s)
        "driver_rss_before_mib": driver_before,
        "driver_peak_rss_mib": _maxrss_mib(),
        "worker_peak_rss_mib": max(roles.values(), default=0.0),
        "role_peak_rss_mib": roles,
        "workers": [
            {"pid": w.pid, "role": w.role(), "peak_rss_mib": w.peak_mib, "titles": sorted(w.titles)}
            for w in peaks.workers.values()
        ],
    }
