"""What `cliplab submit` sends with a job: the repo and its cliplab package, endpoints only, `--env` on request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cliplab.cluster.submit import runtime_env
from cliplab.worker_env import FORWARDED_ENV

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in FORWARDED_ENV:  # other tests' fixtures (the S3 endpoint) may have set some
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "local-token")


def test_the_repo_and_its_package_go_with_endpoints_but_no_credentials(shell: None) -> None:
    env = runtime_env(ROOT, [])
    assert env["working_dir"] == str(ROOT)
    assert env["py_modules"] == [str(ROOT / "platform" / "cliplab")], "workers import the submitted cliplab"
    assert env["env_vars"] == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    }


def test_cluster_endpoints_send_only_what_env_names(shell: None) -> None:
    env = runtime_env(ROOT, ["AWS_ACCESS_KEY_ID=AKIA-explicit"], local_endpoints=False)
    assert env["env_vars"] == {"AWS_ACCESS_KEY_ID": "AKIA-explicit"}


def test_the_submit_client_imports_no_ray_before_it_configures_auth() -> None:
    """Ray reads RAY_AUTH_MODE when it is imported; `enable_token_auth` must run first."""
    probe = "import sys, cliplab.cluster.submit; sys.exit('ray' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    assert subprocess.run([sys.executable, "-c", probe], env=env, timeout=120).returncode == 0
