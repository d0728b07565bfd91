"""Ray Tune sweeps end to end: real local Ray, real DeepSpeed trials, a real MLflow store, shards on the S3
endpoint. Parent/child runs and their params, metrics and artifacts; a failing trial; resume after a kill."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cliplab.config import validate_tree
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.errors import ConfigError
from cliplab.sweep.config import load_sweep
from cliplab.sweep.runner import run_sweep
from cliplab.tracking.mlflow import ZERO_STAGE_USED, params_of
from fixtures_services import assert_no_secret_leaked, joining
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = tiny_model(embed=32, image=32, width=64, text_width=32)


@pytest.fixture(scope="module")
def sweep_bucket(s3_server) -> str:
    from cliplab.embedded import create_bucket

    create_bucket(s3_server.endpoint, "sweep-e2e")
    write_synthscenes("s3://sweep-e2e/train", SynthSpec(num_samples=128, samples_per_shard=32, image_size=32))
    write_synthscenes("s3://sweep-e2e/val", SynthSpec(num_samples=32, samples_per_shard=16, image_size=32, seed=7))
    return "sweep-e2e"


def write_configs(tmp_path: Path, mlflow_uri: str, space: dict, **sweep) -> Path:
    base = {
        "name": "sw",
        "data": {
            "train_shards": "s3://sweep-e2e/train/{00000..00003}.tar",
            "val_shards": "s3://sweep-e2e/val/{00000..00001}.tar",
            "batch_size": 8,
            "num_workers": 0,
            "shuffle_buffer": 16,
            "image_size": 32,
        },
        "model": {"config": TINY_MODEL},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"},
        "train": {"steps": 4, "log_every": 1, "checkpoint_every": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.4, "max_failures": 0},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"tracking_uri": mlflow_uri, "experiment": "sweep-e2e"},
        "eval": {"every_steps": 2, "max_samples": 32, "batch_size": 16},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {
        "name": "tiny",
        "base": "base.yaml",
        "space": space,
        "metric": "retrieval/i2t_R1",
        "mode": "max",
        "scheduler": {"name": "asha", "grace_period": 2},
        "max_concurrent": 1,
        **sweep,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_sweep_tracks_parent_children_and_a_failing_trial(ray_local, sweep_bucket, tmp_path, mlflow_uri, capfd):
    path = write_configs(
        tmp_path,
        mlflow_uri,
        {"optim.lr": {"loguniform": [1e-4, 1e-2]}, "train.crash_at_step": {"grid": [None, 3]}},
        scheduler={"name": "fifo"},
    )  # no early stop: both trials run to their end or fault
    sweep, base_tree = load_sweep(path)
    outcome = run_sweep(sweep, base_tree, path)

    assert len(outcome.rows) == 2
    by_crash = {r.point["train.crash_at_step"]: r for r in outcome.rows}
    assert by_crash[3].status == "ERROR" and "crash_at_step" in by_crash[3].error
    assert by_crash[None].status == "TERMINATED" and by_crash[None].metric is not None
    assert outcome.best is by_crash[None]

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.metric"] == "retrieval/i2t_R1"
    assert parent.data.metrics["trials/error"] == 1 and parent.data.metrics["trials/terminated"] == 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "plots")
    }
    assert {
        "sweep.yaml",
        "results.csv",
        "best_config.yaml",
        "plots/metric_vs_fields.png",
        "plots/parallel_coordinates.png",
    } <= artifacts
    best_cfg = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "best_config.yaml")).read_text())
    assert best_cfg["optim"]["lr"] == pytest.approx(by_crash[None].point["optim.lr"])
    validate_tree(best_cfg)
    with open(client.download_artifacts(parent.info.run_id, "results.csv")) as f:
        assert {row["status"] for row in csv.DictReader(f)} == {"ERROR", "TERMINATED"}

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    plain_params = set(params_of(validate_tree(base_tree))) | {ZERO_STAGE_USED}  # the config's, and the stage run
    for child in children:
        assert set(child.data.params) == plain_params, "a trial logs exactly a plain training run's params"
        crash = child.data.params["train.crash_at_step"]
        if crash == "None":
            assert child.info.status == "FINISHED" and child.data.tags["cliplab.trial_status"] == "TERMINATED"
            assert "retrieval/i2t_R1" in child.data.metrics and "loss" in child.data.metrics
            assert float(child.data.params["optim.lr"]) == pytest.approx(by_crash[None].point["optim.lr"])
        else:
            assert child.info.status == "FAILED" and child.data.tags["cliplab.trial_status"] == "ERROR"
    assert_no_secret_leaked(tmp_path, ray_local, capfd.readouterr())  # Tune copies AWS keys into trial envs


@pytest.mark.slow
def test_asha_stops_the_clearly_worse_trial_early(ray_local, sweep_bucket, tmp_path, mlflow_uri):
    """Two trials one after the other, rungs at steps 1, 2 and 4: the one whose lr is too small to learn is cut at 2.

    Step 1's loss is the untrained model's (equal in both trials, so not a cut); after one update with
    lr 1e-2 the loss drops well below the random model's (about 2.9 against 3.3 on these shards), which
    the lr 1e-7 trial still has at the same rung.
    """
    path = write_configs(
        tmp_path,
        mlflow_uri,
        {"optim.lr": {"grid": [1e-2, 1e-7]}},
        metric="loss",
        mode="min",
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        overrides={"eval.every_steps": None, "data.val_shards": None},
    )
    sweep, base_tree = load_sweep(path)
    outcome = run_sweep(sweep, base_tree, path)

    by_lr = {r.point["optim.lr"]: r for r in outcome.rows}
    assert by_lr[1e-2].status == "TERMINATED" and by_lr[1e-2].step == 4
    assert by_lr[1e-7].status == "EARLY_STOPPED" and by_lr[1e-7].step == 2, outcome.rows
    assert by_lr[1e-7].metric > by_lr[1e-2].metric
    assert outcome.best is by_lr[1e-2]
    child = MlflowClient(mlflow_uri).get_run(by_lr[1e-7].mlflow_run_id)
    assert child.data.tags["cliplab.trial_status"] == "EARLY_STOPPED" and child.info.status == "KILLED"


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_duplicate_children(ray_local, sweep_bucket, tmp_path, mlflow_uri):
    """Kill the sweep's driver once the first trial finished, resume it by name: 2 children, both finished,
    the first one not trained again."""
    import ray

    path = write_configs(tmp_path, mlflow_uri, {"optim.lr": {"grid": [1e-3, 2e-3]}}, scheduler={"name": "fifo"})
    env = joining(ray, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "cliplab.cli", "sweep", str(path)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    client = MlflowClient(mlflow_uri)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        found = client.get_experiment_by_name("sweep-e2e")
        finished = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'") if found else []
        first = next((r.info.run_id for r in finished if "cliplab.trial_id" in r.data.tags), None)
        if first:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    runs_dir = tmp_path / "runs"
    name = next(p.name for p in runs_dir.iterdir() if (p / "cliplab_sweep.json").exists())
    resumed = subprocess.run([*cmd, "--resume", name], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    exp_id = client.get_experiment_by_name("sweep-e2e").experiment_id
    parents = client.search_runs([exp_id], filter_string=f"tags.`cliplab.sweep_run` = '{name}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    trial_ids = [c.data.tags["cliplab.trial_id"] for c in children]
    assert len(trial_ids) == 2 == len(set(trial_ids)), trial_ids
    statuses = {c.data.tags["cliplab.trial_id"]: (c.info.status, c.data.tags.get("cliplab.error")) for c in children}
    assert all(status == "FINISHED" for status, _ in statuses.values()), (statuses, resumed.stdout[-3000:])
    # Tune's own state may predate that trial's end; it is then restored as unfinished and not trained again
    assert "resumed_from_step" not in client.get_run(first).data.metrics


def test_bad_sweep_files_are_refused_before_anything_starts(tmp_path, mlflow_uri):
    path = write_configs(tmp_path, mlflow_uri, {"objective.lambda_cc": {"choice": [1.0]}})
    with pytest.raises(ConfigError, match="lambda_cc"):
        load_sweep(path)
    path = write_configs(tmp_path, mlflow_uri, {"optim.lr": {"uniform": [0.01, 0.001]}})
    with pytest.raises(ConfigError, match=r"space\.optim\.lr.*low < high"):
        load_sweep(path)
    path = write_configs(tmp_path, mlflow_uri, {"data.batch_size": {"grid": [8, -1]}})
    with pytest.raises(ConfigError, match=r"data\.batch_size=-1"):
        load_sweep(path)
    path = write_configs(tmp_path, mlflow_uri, {"optim.lr": {"choice": [1e-3]}}, metric="accuracy")
    with pytest.raises(ConfigError, match="not a metric cliplab reports"):
        load_sweep(path)
    path = write_configs(tmp_path, mlflow_uri, {"optim.lr": {"grid": [1e-3]}}, search="optuna")
    with pytest.raises(ConfigError, match="use choice instead of grid"):
        load_sweep(path)
    with pytest.raises(ConfigError, match="that field is swept"):
        load_sweep(write_configs(tmp_path, mlflow_uri, {"optim.lr": {"choice": [1e-3]}}), ["optim.lr=0.1"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_validate(path: Path) -> None:
    sweep, tree = load_sweep(path)
    assert sweep.space and validate_tree(tree).train.steps > 0


@pytest.mark.slow
def test_an_optuna_trial_whose_worker_is_killed_resumes_from_its_checkpoint(
    ray_local, sweep_bucket, tmp_path, mlflow_uri
):
    """An optuna point within the space; SIGKILL one training worker of its running trial: the trial restarts
    from its checkpoint and finishes once."""
    import threading

    from processes import train_workers

    space = {"optim.lr": {"loguniform": [1e-4, 1e-2]}}
    path = write_configs(tmp_path, mlflow_uri, space, search="optuna", scheduler={"name": "fifo"})
    overrides = ["train.steps=10", "train.step_delay_s=0.5", "scaling.max_failures=1", "eval.every_steps=5"]
    sweep, base_tree = load_sweep(path, overrides)  # paced steps: the kill lands well before step 10
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(outcome=run_sweep(sweep, base_tree, path)), daemon=True)
    thread.start()
    client = MlflowClient(mlflow_uri)

    def child_steps() -> list[int]:
        found = client.get_experiment_by_name("sweep-e2e")
        runs = client.search_runs([found.experiment_id], "tags.`cliplab.trial_id` != ''") if found else []
        return [m.step for r in runs for m in client.get_metric_history(r.info.run_id, "loss")]

    deadline = time.monotonic() + 400
    while max(child_steps(), default=0) < 5 and time.monotonic() < deadline:  # the step-4 report has completed,
        time.sleep(0.5)  # so Ray has registered the step-2 checkpoint at least
    workers = train_workers()
    assert len(workers) == 2, "two training workers of the trial are running"
    os.kill(workers[1].pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the sweep finished after the kill"

    (row,) = out["outcome"].rows
    assert row.status == "TERMINATED" and row.metric is not None
    assert 1e-4 <= row.point["optim.lr"] <= 1e-2 and row.point["optim.lr"] != 1e-3, "optuna's point, not the base's"
    (child,) = client.search_runs(
        [client.get_experiment_by_name("sweep-e2e").experiment_id], "tags.`cliplab.trial_id` != ''"
    )
    assert child.info.status == "FINISHED"
    assert sorted(child_steps()) == list(range(1, 11)), "every step logged once across the restart"
    resumed = [m.value for m in client.get_metric_history(child.info.run_id, "resumed_from_step")]
    assert resumed and resumed[0] >= 2, resumed
