"""Connecting to Ray: the cluster a job was submitted to, or a local instance sized to this machine."""

from __future__ import annotations

import logging
import os

import ray

from cliplab.config import Experiment
from cliplab.errors import ConfigError

log = logging.getLogger("cliplab.runtime")


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS when set (inside `ray job submit`), else start a local Ray sized to this machine."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    log.info("starting a local Ray instance")
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, log_to_driver=True)


def check_fits(exp: Experiment) -> None:
    """Refuse, before any worker starts, a job the running cluster can never place (it would wait forever)."""
    have = ray.cluster_resources()
    s = exp.scaling
    need = {"CPU": s.num_workers * s.cpus_per_worker}
    if s.use_gpu:
        need["GPU"] = s.num_workers * s.gpus_per_worker
    for resource, amount in need.items():
        if amount > have.get(resource, 0) + 1e-9:
            raise ConfigError(
                f"scaling: {s.num_workers} workers x {resource.lower()}s_per_worker need {amount:g} {resource}, "
                f"the Ray cluster has {have.get(resource, 0):g}; lower scaling.num_workers or "
                f"scaling.{resource.lower()}s_per_worker, or add nodes"
            )
