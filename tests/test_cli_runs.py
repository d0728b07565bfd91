"""Smoke tests of the commands that train: `cliplab demo`, `cliplab compare`, `cliplab train --resume RUN`.

Each runs the real command in a subprocess (DeepSpeed, a sqlite MLflow store; the demo starts its own local Ray,
the others join the suite's through RAY_ADDRESS, as under `ray job submit`) at the smallest size that still goes
through every stage; the numbers are not the point, the exit code, the printed summary and what lands in MLflow are.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cliplab.data.synth import SynthSpec, write_synthscenes
from fixtures_services import joining
from tiny_models import tiny_model

TINY = tiny_model()


def cliplab(*args: str, cwd: Path, ray=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The command in a subprocess: on the suite's Ray when given one (RAY_ADDRESS, as on a cluster), else its own."""
    return subprocess.run(
        [sys.executable, "-m", "cliplab.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=joining(ray) if ray else None,
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-runs")
    write_synthscenes(str(root / "train"), SynthSpec(num_samples=64, samples_per_shard=32, image_size=16))
    write_synthscenes(str(root / "val"), SynthSpec(num_samples=16, samples_per_shard=16, image_size=16, seed=7))
    return root


def experiment(path: Path, shards: Path, name: str, **sections: dict) -> Path:
    tree = {
        "name": name,
        "data": {
            "train_shards": f"{shards}/train/{{00000..00001}}.tar",
            "val_shards": f"{shards}/val/00000.tar",
            "batch_size": 8,
            "num_workers": 0,
            "shuffle_buffer": 16,
            "image_size": 16,
        },
        "model": {"config": TINY},
        "optim": {"warmup_steps": 1},
        "deepspeed": {"zero_stage": 1, "precision": "fp32"},
        "train": {"steps": 4, "log_every": 1, "checkpoint_every": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "storage": {"path": str(path.parent / "runs")},
        "tracking": {"tracking_uri": f"sqlite:///{path.parent / 'mlflow.db'}", "experiment": "cli-runs",
                     "log_model": False},
        "eval": {"max_samples": 16, "batch_size": 8},
    }  # fmt: skip
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.slow
def test_demo_runs_end_to_end_at_reduced_size(tmp_path: Path) -> None:
    done = cliplab("demo", "--workdir", str(tmp_path / "w"), "--train-samples", "400", "--steps", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo finished in" in done.stdout and "zeroshot/shape/top1" in done.stdout
    assert "Failed to query Ray Train Controller" not in done.stdout + done.stderr, "cleaner spam"
    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cliplab-demo").experiment_id])
    assert run.info.status == "FINISHED" and "loss" in run.data.metrics


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_uri")  # the store at tmp_path/mlflow.db, schema made once
def test_compare_trains_sibling_runs_under_one_parent(ray_local, tmp_path: Path, shards: Path) -> None:
    a = experiment(tmp_path / "a.yaml", shards, "cmp-clip", train={"steps": 2})
    b = experiment(tmp_path / "b.yaml", shards, "cmp-mcd", train={"steps": 2}, objective={"name": "mcd"},
                   data={"views": {"count": 1}})  # fmt: skip
    done = cliplab("compare", str(a), str(b), cwd=tmp_path, ray=ray_local)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cmp-clip" in done.stdout and "cmp-mcd" in done.stdout and "each run is a child of it" in done.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cli-runs").experiment_id])
    (parent,) = [r for r in runs if "cliplab.compare" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["objective.name"] for r in children) == ["clip", "mcd"]
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    assert {"comparison.csv", "plots"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_uri")  # the store at tmp_path/mlflow.db, schema made once
def test_train_resume_continues_the_crashed_run_from_its_checkpoint(ray_local, tmp_path: Path, shards: Path) -> None:
    path = experiment(tmp_path / "exp.yaml", shards, "resume", train={"crash_at_step": 3})
    crashed = cliplab("train", str(path), cwd=tmp_path, ray=ray_local)
    assert crashed.returncode != 0 and "crash_at_step" in crashed.stdout + crashed.stderr
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    resumed = cliplab("train", str(path), "--resume", run_dir.name, cwd=tmp_path, ray=ray_local)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"run {run_dir.name}" in resumed.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cli-runs").experiment_id])
    assert run.info.status == "FINISHED"
    assert (run.data.params["deepspeed.zero_stage"], run.data.params["deepspeed.zero_stage_used"]) == ("1", "0")
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 4
    assert "resumed from checkpoint at step 2" in resumed.stdout + resumed.stderr
