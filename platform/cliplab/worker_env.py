"""What a driver hands its Ray workers and `cliplab submit` its job through a runtime env.

Endpoints and settings, never credentials: a runtime env is written to Ray's logs and shown by its dashboard
and job API. Credentials reach workers through their own environment: inherited by a local Ray, a Kubernetes
Secret on KubeRay. Importing this module imports no Ray (`cliplab submit` must set RAY_AUTH_MODE before Ray
reads it at import).
"""

from __future__ import annotations

import os

FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
)


def forwarded_env() -> dict[str, str]:
    """The FORWARDED_ENV variables set in this process."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
