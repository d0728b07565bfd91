"""Fixtures for the real local services the slow tests need: one Ray instance per test process, MLflow stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray sized to this machine, started after the S3 env is set so workers inherit it."""
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=True,
             log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    """A fresh sqlite MLflow store (artifacts beside it) for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
