"""Fault injection against the real parts: killed workers, SIGINT, failures, storage outages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import fsspec
import psutil
import pytest
from mlflow.tracking import MlflowClient

from cliplab.config import dump_yaml, validate_tree
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.storage import s3
from cliplab.train import checkpoint
from cliplab.train.trainer import TrainingFailed, run_training
from fixtures_services import joining
from processes import train_workers
from tiny_models import tiny_model

pytestmark = pytest.mark.slow

BUCKET = "faults"
TINY_MODEL = tiny_model(image=32, patch=16, heads=1)
RECOVERY_BOUND_S = 420  # correctness bound (well inside pytest-timeout), not a speed target
STEP_DELAY_S = 1.0  # paces the tiny model's steps, so a kill or an outage lands between two known steps


@pytest.fixture(scope="module")
def fault_shards(s3_server) -> str:
    from cliplab.embedded import create_bucket

    create_bucket(s3_server.endpoint, BUCKET)
    write_synthscenes(f"s3://{BUCKET}/train", SynthSpec(num_samples=256, samples_per_shard=64, image_size=32))
    return f"s3://{BUCKET}/train/{{00000..00003}}.tar"


def experiment(tmp_path: Path, mlflow_uri: str, shards: str, **sections: dict[str, Any]):
    tree: dict[str, Any] = {
        "name": "faults",
        "data": {"train_shards": shards, "batch_size": 8, "num_workers": 1, "shuffle_buffer": 16, "image_size": 32},
        "model": {"config": TINY_MODEL},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"},
        "train": {"steps": 30, "log_every": 1, "checkpoint_every": 6, "step_delay_s": STEP_DELAY_S},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1, "collective_timeout_s": 60},
        "storage": {"path": f"s3://{BUCKET}/runs/{tmp_path.name}"},
        "tracking": {"tracking_uri": mlflow_uri, "experiment": "faults"},
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return validate_tree(tree, "test")


def in_thread(fn, *args) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `fn(*args)` in a thread; the dict gets `result` or `error`."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn(*args)
        except Exception as exc:
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def s3_now() -> fsspec.AbstractFileSystem:
    """cliplab's S3 filesystem at the endpoint set now (a test's proxy or moto itself), listings re-read:
    fsspec's own `filesystem("s3")` is cached without the endpoint and kept an earlier test's proxy."""
    fs = s3()
    fs.invalidate_cache()
    return fs


def checkpoints(storage: str) -> list[str]:
    fs = s3_now()
    found = fs.glob(f"{storage.removeprefix('s3://')}/*/checkpoint_step*") if fs.exists(storage) else []
    return sorted(p.rsplit("/", 1)[-1] for p in found)


def registered_step(storage: str) -> int:
    """The step of the latest checkpoint Ray Train has registered (its controller's snapshot), 0 before one.

    A worker uploads a checkpoint during its report; the controller registers it at its next poll of the
    workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: 0.5 s in the suite). A run that fails in between resumes from the
    checkpoint registered before.
    """
    fs = s3_now()
    found = fs.glob(f"{storage.removeprefix('s3://')}/*/checkpoint_manager_snapshot.json")
    latest = json.loads(fs.cat_file(found[0])).get("latest_checkpoint_result") if found else None
    return int(latest["checkpoint_dir_name"].removeprefix("checkpoint_step")) if latest else 0


def last_logged_step(client: MlflowClient) -> int:
    """The latest `loss` step of the only run in the test's MLflow store (0 before the first)."""
    found = client.get_experiment_by_name("faults")
    runs = client.search_runs([found.experiment_id]) if found else []
    return max((m.step for r in runs for m in client.get_metric_history(r.info.run_id, "loss")), default=0)


def loss_steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def only_run(client: MlflowClient):
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_sigint_marks_run_killed_and_resume_continues_it_once(ray_local, fault_shards, tmp_path, mlflow_uri):
    name = f"sigint-{tmp_path.name}"
    exp = experiment(tmp_path, mlflow_uri, fault_shards, train={"steps": 16}, tracking={"run_name": name})
    config = tmp_path / "experiment.yaml"
    config.write_text(dump_yaml(exp))
    env = joining(ray_local)
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "cliplab.cli", "train", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    client = MlflowClient(mlflow_uri)
    try:
        wait_for(lambda: registered_step(exp.storage.path) >= 6, 300, "the step-6 checkpoint of the driver's run")
        driver.send_signal(signal.SIGINT)
        driver.wait(120)
    finally:
        driver.kill()
    killed = only_run(client)
    assert killed.info.status == "KILLED", (tmp_path / "driver.log").read_text()[-3000:]

    outcome = run_training(exp, resume=name)
    assert outcome.mlflow_run_id == killed.info.run_id
    assert client.get_run(outcome.mlflow_run_id).info.status == "FINISHED"
    assert loss_steps(client, outcome.mlflow_run_id) == list(range(1, 17)), "each step logged once"
    resumed = [m.value for m in client.get_metric_history(outcome.mlflow_run_id, "resumed_from_step")]
    assert resumed and resumed[0] >= 6


def test_failed_run_is_marked_failed(ray_local, fault_shards, tmp_path, mlflow_uri):
    missing = f"s3://{BUCKET}/missing-{tmp_path.name}/{{00000..00003}}.tar"
    exp = experiment(tmp_path, mlflow_uri, missing, scaling={"max_failures": 0})
    with pytest.raises(TrainingFailed, match="none of the 4 shards is readable"):
        run_training(exp)
    assert only_run(MlflowClient(mlflow_uri)).info.status == "FAILED"


@pytest.fixture(scope="module")
def small_shards(s3_server) -> str:
    """16 shards of 16 samples: each reader opens a new shard every other step, so outages hit reads."""
    from cliplab.embedded import create_bucket

    create_bucket(s3_server.endpoint, BUCKET)
    write_synthscenes(f"s3://{BUCKET}/small", SynthSpec(num_samples=256, samples_per_shard=16, image_size=32))
    return f"s3://{BUCKET}/small/{{00000..00015}}.tar"


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """A proxy in front of the S3 endpoint; the run's driver, controller and workers all talk to it."""
    from tcpproxy import TcpProxy

    with TcpProxy((s3_server.host, s3_server.port)) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.endpoint)
        yield p


def losses(client: MlflowClient, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "loss")}


def test_short_outages_during_shard_reads_and_checkpoint_upload_lose_nothing(
    ray_local, small_shards, tmp_path, mlflow_uri, proxy, capfd
):
    def exp(name: str, experiment_name: str, step_delay_s: float):
        sections = {
            "train": {"steps": 12, "step_delay_s": step_delay_s},
            "storage": {"path": f"s3://{BUCKET}/runs/{tmp_path.name}-{name}", "outage_budget_s": 90},
            "tracking": {"tracking_uri": mlflow_uri, "experiment": experiment_name},
        }
        return experiment(tmp_path, mlflow_uri, small_shards, **sections)

    reference = run_training(exp("reference", "faults-reference", 0.0))  # unpaced: the pause changes no loss
    client = MlflowClient(mlflow_uri)
    outaged = exp("outages", "faults", STEP_DELAY_S)
    thread, out = in_thread(run_training, outaged)
    wait_for(lambda: last_logged_step(client) >= 2, 300, "step 2")
    proxy.outage(12).join()  # shard reads: every reader opens a new shard every other step
    wait_for(lambda: last_logged_step(client) >= 5, 300, "step 5")
    proxy.outage(12).join()  # the step-6 checkpoint is uploaded in here
    thread.join(RECOVERY_BOUND_S)
    assert not thread.is_alive() and "error" not in out, out.get("error")
    outcome = out["result"]

    logs = capfd.readouterr().out
    assert "unreachable" in logs and "retrying" in logs, "the outages were hit (and waited out)"
    assert client.get_run(outcome.mlflow_run_id).info.status == "FINISHED"
    assert loss_steps(client, outcome.mlflow_run_id) == list(range(1, 13)), "each step once, none lost"
    assert not client.get_metric_history(outcome.mlflow_run_id, "resumed_from_step"), "no restart"
    assert client.get_run(outcome.mlflow_run_id).data.metrics["data/skipped_shards"] == 0
    assert checkpoints(outaged.storage.path) == ["checkpoint_step00000006", "checkpoint_step00000012"]
    expected = losses(client, reference.mlflow_run_id)
    assert losses(client, outcome.mlflow_run_id) == pytest.approx(expected, rel=1e-4)


def test_permanent_outage_fails_within_its_budget_naming_the_endpoint(
    ray_local, small_shards, tmp_path, mlflow_uri, proxy
):
    budget = 10
    exp = experiment(tmp_path, mlflow_uri, small_shards, storage={"outage_budget_s": budget})
    thread, out = in_thread(run_training, exp)
    client = MlflowClient(mlflow_uri)
    wait_for(lambda: last_logged_step(client) >= 2, 300, "step 2")
    proxy.down()
    down_at = time.monotonic()
    thread.join(RECOVERY_BOUND_S)
    took = time.monotonic() - down_at
    assert not thread.is_alive(), "the run did not fail"
    error = out.get("error")
    assert isinstance(error, TrainingFailed), error
    assert proxy.endpoint in str(error) and f"s3://{BUCKET}/" in str(error), error
    assert "storage.outage_budget_s" in str(error)
    assert took < budget + 60, f"failed {took:.0f} s after the endpoint went down (budget {budget} s)"
    assert only_run(client).info.status == "FAILED"
    print(f"permanent outage: failed {took:.0f} s after the endpoint went down (budget {budget} s)")


def test_a_worker_sigkilled_during_a_checkpoint_upload_resumes_from_the_previous_complete_one(
    ray_local, fault_shards, tmp_path, mlflow_uri, proxy, capfd
):
    """A training worker killed by PID while its step-12 upload waits for the endpoint: its DataLoader worker dies
    with it, Ray Train detects the loss, and the run resumes from step 6 (the half-written checkpoint is never
    registered) and logs every step once."""
    exp = experiment(tmp_path, mlflow_uri, fault_shards, train={"steps": 18}, storage={"outage_budget_s": 120})
    thread, out = in_thread(run_training, exp)
    client = MlflowClient(mlflow_uri)
    wait_for(lambda: last_logged_step(client) >= 11, 300, "step 11")
    assert registered_step(exp.storage.path) == 6, "the step-6 checkpoint is registered before the outage"
    proxy.down()  # the step-12 upload now waits for the endpoint (shards for steps 9-16 are already read)
    seen: list[str] = []

    def upload_blocked() -> bool:  # a worker's retry line for the marker Ray checks first, or the checkpoint
        seen.append(capfd.readouterr().out)
        return any(k in "".join(seen) for k in (".validate_storage_marker: ", "checkpoint_step00000012"))

    wait_for(upload_blocked, 120, "a checkpoint upload waiting for the endpoint")
    victim = wait_for(lambda: len(w := train_workers()) == 2 and w, 30, "two train workers")[-1]
    loader_children = victim.children(recursive=True)
    assert loader_children, "the DataLoader worker is a child of the Ray worker"
    killed_at = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(loader_children, timeout=10)
    proxy.up()
    try:
        assert not alive, f"DataLoader workers outlived their SIGKILLed parent: {alive}"
        thread.join(RECOVERY_BOUND_S)
        assert not thread.is_alive(), f"the run did not recover within {RECOVERY_BOUND_S} s of the kill"
    finally:
        for proc in alive:
            proc.kill()
    assert "error" not in out, out.get("error")
    outcome = out["result"]
    assert client.get_run(outcome.mlflow_run_id).info.status == "FINISHED"
    resumed = [m.value for m in client.get_metric_history(outcome.mlflow_run_id, "resumed_from_step")]
    assert resumed == [6], "the half-written step-12 checkpoint was never registered"
    assert loss_steps(client, outcome.mlflow_run_id) == list(range(1, 19)), "each step once"
    left = list(Path(tempfile.gettempdir()).glob(f"{checkpoint.TEMP_PREFIX}{victim.pid}-*"))
    assert left == [], "the killed worker's temp checkpoint is removed by the next save"
    print(f"recovered from the SIGKILL in {time.monotonic() - killed_at:.0f} s, resumed at step 6")
