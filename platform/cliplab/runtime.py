"""Connecting to Ray: the cluster a job was submitted to, or a local instance sized to this machine."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from cliplab.config import Experiment
from cliplab.errors import ConfigError
from cliplab.resources import worker_resources

log = logging.getLogger("cliplab.runtime")
DASHBOARD_VAR = "CLIPLAB_RAY_DASHBOARD"  # the local Ray's dashboard costs seconds of start-up; off unless asked
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS when set (inside `ray job submit`), else start a local Ray sized to this machine."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    dashboard = os.environ.get(DASHBOARD_VAR, "") not in ("", "0")
    log.info(
        "starting a local Ray instance on 127.0.0.1 (%s; RAY_ADDRESS=auto reuses a running `ray start --head`)",
        "with its dashboard" if dashboard else f"no dashboard: {DASHBOARD_VAR}=1 starts one",
    )
    hook = {} if dashboard else {"runtime_env": {"worker_process_setup_hook": f"{__name__}.quiet_pg_cleaner"}}
    context = start_local_ray(
        num_cpus=num_cpus or os.cpu_count(), include_dashboard=dashboard, log_to_driver=True, **hook
    )
    if dashboard and context.dashboard_url:
        log.info("Ray dashboard: http://%s", context.dashboard_url)


def quiet_pg_cleaner() -> None:
    """Worker set-up hook of a local Ray without a dashboard: drop Ray Train's placement-group cleaner warnings.

    The cleaner asks the state API (served by the dashboard) once a second whether the run's controller lives
    and warns on every failure, hundreds of lines a run. A local instance ends with this process, placement
    groups included, so there is nothing left for it to clean.
    """
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def start_local_ray(**init_kwargs: Any) -> Any:
    """Start a local Ray whose GCS, raylet, agents and workers listen on 127.0.0.1 only (token auth as configured).

    Ray turns a node address of 127.0.0.1 into the machine's IP (then every server listens on all interfaces)
    unless its cluster mode is off, its setting RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once at import; it is
    switched off for this start only, so that connecting to a cluster later still uses the real address.
    """
    from ray._private import ray_constants

    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        return ray.init(address="local", _node_ip_address="127.0.0.1", **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode


def check_fits(exp: Experiment) -> None:
    """Refuse, before any worker starts, a job the running cluster can never place (it would wait forever)."""
    have = ray.cluster_resources()
    s = exp.scaling
    need = worker_resources(s)
    for resource, amount in need.items():
        if amount > have.get(resource, 0) + 1e-9:
            raise ConfigError(
                f"scaling: {s.num_workers} workers x {resource.lower()}s_per_worker need {amount:g} {resource}, "
                f"the Ray cluster has {have.get(resource, 0):g}; lower scaling.num_workers or "
                f"scaling.{resource.lower()}s_per_worker, or add nodes"
            )
