"""Fixtures for the real local services: one Ray instance per test process, MLflow stores, a gloo group."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

# Credentials every test process and Ray worker sees: recognisable, so a test can look for leaks (moto takes any).
TEST_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIACLIPLAB7LEAKCHECK",
    "AWS_SECRET_ACCESS_KEY": "cliplab-leak-check-secret-5e1f",
    "MLFLOW_TRACKING_PASSWORD": "cliplab-leak-check-password-a09c",
}


def assert_no_secret_leaked(tmp_path: Path, ray, captured) -> None:
    """The session's credentials appear in no MLflow param, tag, metric or artifact (the store and artifact root
    beside it hold them all), no Ray log of this session (runtime envs are logged), nor anything printed."""
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    files = [p for root in (tmp_path, session / "logs") for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.suffix == ".log" for p in files)
    blobs = [(str(p), p.read_bytes()) for p in files] + [("driver output", (captured.out + captured.err).encode())]
    for name, secret in TEST_SECRETS.items():
        leaks = [where for where, blob in blobs if secret.encode() in blob]
        assert leaks == [], f"{name} leaked into {leaks}"


def joining(ray, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that joins the suite's Ray (RAY_ADDRESS, as under `ray job submit`)."""
    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, **extra}


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray sized to this machine, started after the S3 env is set so workers inherit it."""
    import ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    ray.init(
        address="local",
        num_cpus=max(2, os.cpu_count() or 2),
        include_dashboard=True,
        log_to_driver=True,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty sqlite MLflow store with its schema, made once: creating the tables (MLflow's migrations) costs
    ~2 s, copying the file nothing."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from cliplab.tracking.mlflow import local_artifact_root

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{path}", local_artifact_root(f"sqlite:///{path}"))  # as cliplab's: not ./mlruns
    return path


@pytest.fixture
def mlflow_uri(tmp_path: Path, mlflow_template: Path) -> str:
    """A fresh sqlite MLflow store for one test: a copy of the session's empty store. An experiment a test makes
    itself takes `local_artifact_root(uri)`, as cliplab's own do (MLflow's default is ./mlruns in the cwd)."""
    shutil.copyfile(mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def process_group():
    """A single-process gloo group in the test process, for DeepSpeed engines built without Ray."""
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DS_ACCELERATOR="cpu",
        )
        torch.distributed.init_process_group("gloo")
    yield
