"""Shared fixtures: the real local services (S3 endpoint on 127.0.0.1, Ray, MLflow stores)."""

from __future__ import annotations

import os
import uuid

import pytest

from cliplab.embedded import create_bucket, s3_env, start_s3_server
from fixtures_services import (  # noqa: F401  (fixtures)
    TEST_SECRETS,
    mlflow_template,
    mlflow_uri,
    process_group,
    ray_local,
)

# Ray Train's controller polls its workers every 2 s; a worker's report, and a run's end, wait for the next poll.
# The suite's runs last seconds, so here it polls every 0.5 s (before any Ray starts; subprocesses inherit it).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port, with the env vars every client (and Ray worker) reads."""
    saved = dict(os.environ)
    with start_s3_server() as server:
        os.environ.update(s3_env(server.endpoint) | TEST_SECRETS)
        yield server
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket for one test."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_server.endpoint, name)
    return name
