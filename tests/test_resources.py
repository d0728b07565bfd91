"""One sizing rule for Train workers: what check_fits, the sweep runner and cluster render all count."""

from __future__ import annotations

from cliplab.config import ScalingSection
from cliplab.resources import worker_resources


def test_workers_cpus_gpus_and_a_driver() -> None:
    cpu = ScalingSection(num_workers=2, cpus_per_worker=0.45)
    assert worker_resources(cpu) == {"CPU": 0.9}
    assert worker_resources(cpu, extra_cpus=0.1) == {"CPU": 1.0}
    gpu = ScalingSection(num_workers=4, use_gpu=True, cpus_per_worker=8, gpus_per_worker=0.5)
    assert worker_resources(gpu, workers=2, extra_cpus=2) == {"CPU": 18, "GPU": 1.0}
