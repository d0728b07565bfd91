"""`ray job submit` and `cliplab submit` against a real Ray head started with `ray start --head` on 127.0.0.1
(token auth on, as Ray 2.60 defaults): the job trains, MLflow holds its run; a failing job fails the command;
a client without the cluster's token is refused with a clear error."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cliplab.data.synth import SynthSpec, write_synthscenes

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "tests/cluster/job_tiny.yaml"
pytestmark = pytest.mark.slow


def _port() -> int:
    """A free port above Ray's worker port range (10002-19999), as every port of a second Ray on a host must be."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(pgid: int) -> None:
    """Stop this head's processes only (its own process group): never `ray stop`, which stops every Ray here."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + grace
        try:
            os.killpg(pgid, sig)
            while time.monotonic() < deadline:
                os.killpg(pgid, 0)
                time.sleep(0.5)
        except ProcessLookupError:
            return


@pytest.fixture(scope="module")
def ray_head(s3_server, tmp_path_factory):
    """A Ray head of its own (own ports, temp dir, token and process group), with the venv first on PATH for the
    job driver. The token is the test's own: `RAY_AUTH_MODE=token ray start` refuses to start without one, and a
    fresh machine has no ~/.ray/auth_token. The own temp dir keeps /tmp/ray/ray_current_cluster (what
    `ray.init()` and `ray status` find) pointing at whatever Ray the host already runs."""
    from cliplab.embedded import create_bucket

    create_bucket(s3_server.endpoint, "job-e2e")
    write_synthscenes("s3://job-e2e/train", SynthSpec(num_samples=128, samples_per_shard=32, image_size=32))
    write_synthscenes("s3://job-e2e/val", SynthSpec(num_samples=32, samples_per_shard=16, image_size=32, seed=7))
    token = tmp_path_factory.mktemp("ray-auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    temp_dir = tempfile.mkdtemp(prefix="cliplab-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    dashboard = _port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "DS_ACCELERATOR": "cpu",
    }
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--num-cpus=2",
        f"--ray-client-server-port={_port()}",
        f"--dashboard-agent-listen-port={_port()}",
        f"--dashboard-agent-grpc-port={_port()}",
        f"--metrics-export-port={_port()}",
        f"--runtime-env-agent-port={_port()}",
        f"--node-manager-port={_port()}",
        f"--object-manager-port={_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        bearer = {"Authorization": f"Bearer {token.read_text()}"}
        probe = urllib.request.Request(f"{address}/api/version", headers=bearer)
        while time.monotonic() < deadline:  # the job API answers once the dashboard's job module is up
            try:
                urllib.request.urlopen(probe, timeout=2)
                break
            except OSError:  # refused, or (HTTPError) not ready; a 401 would mean the probe lost its token
                time.sleep(1)
        else:
            raise AssertionError(f"the job API at {address} did not answer within 120 s")
        yield address, {**env, "RAY_ADDRESS": address}
    finally:
        _stop(proc.pid)  # also after a failed start: whatever it left running goes
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_env(env: dict, tmp_path: Path) -> dict:
    return {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(ROOT / "platform")}


def _runs(tmp_path: Path) -> list:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    found = client.get_experiment_by_name("job-e2e")
    return client.search_runs([found.experiment_id]) if found else []


@pytest.mark.usefixtures("mlflow_uri")  # the store at tmp_path/mlflow.db, schema made once
def test_ray_job_submit_cli_trains_and_tracks(ray_head, tmp_path):
    address, env = ray_head
    env = _job_env(env, tmp_path)
    runtime = {
        "env_vars": {k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI") if k in env}
    }
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps(runtime),
            "--",
            "python",
            "jobs/train.py",
            "--config",
            CONFIG,
            "--set",
            f"storage.path={tmp_path / 'runs'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", proc.stdout + proc.stderr), proc.stdout[-2000:]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED" and "retrieval/i2t_R1" in run.data.metrics and "loss" in run.data.metrics


@pytest.mark.usefixtures("mlflow_uri")  # the store at tmp_path/mlflow.db, schema made once
def test_cliplab_submit_follows_the_job_and_reports_failure(ray_head, tmp_path):
    address, env = ray_head
    env = _job_env(env, tmp_path)
    env.pop("RAY_AUTH_MODE")  # cliplab submit turns token auth on itself when a token is configured
    base = [
        sys.executable,
        "-m",
        "cliplab.cli",
        "submit",
        "train",
        str(ROOT / CONFIG),
        "--address",
        address,
        "--repo",  # run from another directory: the checkout to upload is named
        str(ROOT),
        "--set",
        f"storage.path={tmp_path / 'runs'}",
    ]
    ok = subprocess.run(base, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout[-4000:] + ok.stderr[-4000:]
    assert "submitted cliplab-train-" in ok.stdout and "SUCCEEDED" in ok.stdout and "step 4/4" in ok.stdout
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED" and "loss" in run.data.metrics

    bad = subprocess.run(
        [*base, "--set", "train.crash_at_step=2", "--set", "scaling.max_failures=0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert bad.returncode != 0
    assert "FAILED" in bad.stdout and "injected fault" in bad.stdout + bad.stderr
    assert "cliplab: error: job cliplab-train-" in bad.stderr


def test_workers_import_the_submitted_cliplab(ray_head):
    """Ray Train workers and tasks of a `cliplab submit` job run the uploaded code, not the image's install."""
    from ray.job_submission import JobSubmissionClient

    from cliplab.cluster.submit import runtime_env

    address, env = ray_head
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    probe = (
        "import ray; ray.init(); "
        "print('worker imports', ray.get(ray.remote(lambda: __import__('cliplab').__file__).remote()))"
    )
    job = client.submit_job(entrypoint=f'python -c "{probe}"', runtime_env=runtime_env(ROOT, []))
    deadline = time.monotonic() + 300
    while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert str(client.get_job_status(job)) == "SUCCEEDED", logs
    imported = re.search(r"worker imports (\S+)", logs).group(1)
    assert "/py_modules_files/" in imported and not imported.startswith(str(ROOT)), imported


@pytest.mark.usefixtures("mlflow_uri")  # the store at tmp_path/mlflow.db, schema made once
def test_cliplab_submit_without_the_cluster_token_is_refused_clearly(ray_head, tmp_path):
    address, env = ray_head
    env = {**_job_env(env, tmp_path), "RAY_AUTH_TOKEN": "not-the-token"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cliplab.cli",
            "submit",
            "train",
            str(ROOT / CONFIG),
            "--address",
            address,
            "--repo",
            ROOT,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert f"cliplab: error: --address {address}: Authentication failed" in proc.stderr
    assert "RAY_AUTH_TOKEN" in proc.stderr and "Traceback" not in proc.stderr
