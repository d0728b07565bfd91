"""How much of each Ray resource a set of Train workers holds: one rule for every place that sizes a job.

`check_fits` (runtime.py) compares it with the running cluster, the sweep runner adds each trial's driver
and packs trials, and `cluster render` sizes a node for the workers placed on it.
"""

from __future__ import annotations

from cliplab.config import ScalingSection


def worker_resources(scaling: ScalingSection, workers: int | None = None, extra_cpus: float = 0.0) -> dict[str, float]:
    """Ray resources of `workers` Train workers (default `scaling.num_workers`) plus `extra_cpus` (a driver).

    GPUs appear only when `scaling.use_gpu`.
    """
    n = scaling.num_workers if workers is None else workers
    need = {"CPU": extra_cpus + n * scaling.cpus_per_worker}
    if scaling.use_gpu:
        need["GPU"] = n * scaling.gpus_per_worker
    return need
