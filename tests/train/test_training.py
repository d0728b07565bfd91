"""End to end: Ray TorchTrainer + DeepSpeed ZeRO workers streaming SynthScenes from the S3 endpoint,
checkpointing to S3, tracked in a real MLflow store; resume-from-crash equivalence; corrupt data."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import fsspec
import mlflow
import open_clip
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from cliplab.config import validate_tree
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.tracking.registry import using_tracking_uri
from cliplab.train.trainer import run_training
from fixtures_services import assert_no_secret_leaked
from tarfaults import cut_inside_member, with_garbage_jpg
from tiny_models import tiny_model

pytestmark = pytest.mark.slow

TINY_MODEL = tiny_model(embed=32, image=32, width=64, text_width=32)


@pytest.fixture(scope="module")
def synth_bucket(s3_server) -> str:
    """Train (4 shards) and val (2 shards) SynthScenes at 32 px in a fresh bucket, shared by this module."""
    from cliplab.embedded import create_bucket

    create_bucket(s3_server.endpoint, "train-e2e")
    write_synthscenes("s3://train-e2e/train", SynthSpec(num_samples=256, samples_per_shard=64, image_size=32))
    write_synthscenes("s3://train-e2e/val", SynthSpec(num_samples=64, samples_per_shard=32, image_size=32, seed=7))
    return "train-e2e"


def experiment(tmp_path: Path, mlflow_uri: str, **sections):
    tree = {
        "name": "e2e",
        "data": {
            "train_shards": "s3://train-e2e/train/{00000..00003}.tar",
            "val_shards": "s3://train-e2e/val/{00000..00001}.tar",
            "batch_size": 8,
            "num_workers": 1,
            "shuffle_buffer": 32,
            "image_size": 32,
        },
        "model": {"config": TINY_MODEL},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "train": {"steps": 6, "log_every": 1, "checkpoint_every": 3},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 1},
        "storage": {"path": f"s3://train-e2e/runs/{tmp_path.name}"},
        "tracking": {"tracking_uri": mlflow_uri, "experiment": "e2e"},
        "eval": {
            "every_steps": 6,
            "max_samples": 64,
            "batch_size": 32,
            "zeroshot": [
                {
                    "name": "colour",
                    "label_field": "labels.colour",
                    "classnames": ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"],
                }
            ],
        },
    }
    for section, values in sections.items():
        tree[section] = {**tree.get(section, {}), **values}
    return validate_tree(tree, "test")


@pytest.mark.parametrize(
    ("zero", "precision", "objective"), [(1, "fp32", "clip"), (2, "bf16", "mcd"), (3, "fp32", "clip")]
)
def test_train_tracks_checkpoints_and_exports(
    ray_local, synth_bucket, tmp_path, mlflow_uri, zero, precision, objective, capfd
):
    sections = {"deepspeed": {"zero_stage": zero, "precision": precision}, "objective": {"name": objective}}
    if zero == 3:  # uneven eval shares (32 + 31 samples in batches of 31): rank 0 encodes 2 batches, rank 1 one
        sections["eval"] = {"max_samples": 63, "batch_size": 31}
    if objective == "mcd":  # with the EMA teacher: the FLOP counter and every step run it through the real loop
        sections |= {
            "objective": {"name": "mcd", "distill_teacher": "ema"},
            "data": {"views": {"count": 2}},
            "eval": {"misalignment_probe": True, "probe_images": 16},
        }
    outcome = run_training(experiment(tmp_path, mlflow_uri, **sections))
    assert not list(Path(tempfile.gettempdir()).glob(f"cliplab-export-{outcome.mlflow_run_id}*")), "export dir left"

    client = MlflowClient(mlflow_uri)
    run = client.get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["objective"] == objective and run.data.tags["model"] == "inline"
    assert run.data.params["deepspeed.zero_stage"] == run.data.params["deepspeed.zero_stage_used"] == str(zero)
    first_term = "loss_i2t" if objective == "clip" else "loss_clip"
    for key in (
        "loss",
        first_term,
        "lr",
        "logit_scale",
        "samples_per_s",
        "data_wait_frac",
        "tflops_per_s",
        "data/skipped_samples",
        "zeroshot/colour/top1",
        "retrieval/i2t_R1",
    ):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "plots")
    }
    assert {"config.yaml", "plots/loss_curve.png"} <= artifacts
    versions = client.search_model_versions("name = 'cliplab-e2e'")
    assert run.info.run_id in {v.run_id for v in versions}, "the export is a registered model version of this run"
    if objective == "mcd":
        for key in ("loss_clip", "loss_contrast", "loss_distill", "probe/spearman_scale", "probe/spearman_content"):
            assert key in run.data.metrics, key
        assert "plots/misalignment_step00000006.png" in artifacts

    fs = fsspec.filesystem("s3")
    assert fs.ls(f"{outcome.storage.removeprefix('s3://')}/export")
    if objective == "mcd":
        assert any(p.endswith("/objective_rank0.pt") for p in fs.ls(outcome.checkpoint)), "EMA tower checkpointed"
    local = tmp_path / "export"
    fs.get(f"{outcome.storage}/export/", str(local), recursive=True)
    open_clip.add_model_config(str(local / "cliplab-e2e.json"))
    model, _, _ = open_clip.create_model_and_transforms("cliplab-e2e", pretrained=str(local / "open_clip_model.pt"))
    assert model.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 32)
    if (zero, objective) == (1, "clip"):
        assert_no_secret_leaked(tmp_path, ray_local, capfd.readouterr())
    version = next(v for v in versions if v.run_id == run.info.run_id)
    with using_tracking_uri(mlflow_uri):
        registered = mlflow.pyfunc.load_model(f"models:/cliplab-e2e/{version.version}")
    tokens = open_clip.SimpleTokenizer(context_length=16)(["a red circle"])
    expected = model.encode_text(tokens, normalize=True).detach().numpy()
    assert registered.predict(pd.DataFrame({"text": ["a red circle"]})) == pytest.approx(expected, abs=1e-5)


def test_crash_resumes_mid_epoch_with_same_trajectory(ray_local, synth_bucket, tmp_path, mlflow_uri):
    """A run that crashes at step 6 resumes from its step-4 checkpoint mid-epoch and follows the uninterrupted
    run's losses step for step. The crashed run decodes on the device (data.decode: device, on a CPU worker
    here), the straight one on CPU: the two decode paths make the same images, so the losses match too."""
    steps = {"steps": 8, "log_every": 1, "checkpoint_every": 4}
    straight = run_training(experiment(tmp_path / "a", mlflow_uri, train=steps, data={"decode": "cpu"}))
    crashed = run_training(
        experiment(tmp_path / "b", mlflow_uri, train={**steps, "crash_at_step": 6}, data={"decode": "device"})
    )

    client = MlflowClient(mlflow_uri)

    def history(run_id: str) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp):
            out.setdefault(m.step, []).append(m.value)
        return out

    a, b = history(straight.mlflow_run_id), history(crashed.mlflow_run_id)
    assert sorted(b) == list(range(1, 9))
    assert all(len(v) == 1 for v in b.values()), "steps 5-6 ran again after resuming from step 4, logged once"
    assert [m.value for m in client.get_metric_history(crashed.mlflow_run_id, "resumed_from_step")] == [4]
    for step in range(1, 9):
        assert b[step][-1] == pytest.approx(a[step][-1], rel=1e-4), f"step {step}"


def test_corrupt_sample_and_shard_are_skipped_and_counted(ray_local, synth_bucket, tmp_path, mlflow_uri):
    fs = fsspec.filesystem("s3")
    base = f"s3://{synth_bucket}/train"
    bad = f"s3://{synth_bucket}/bad-{tmp_path.name}"
    fs.pipe_file(f"{bad}/00000.tar", with_garbage_jpg(fs.cat_file(f"{base}/00000.tar")))
    fs.pipe_file(f"{bad}/00001.tar", cut_inside_member(fs.cat_file(f"{base}/00001.tar")))
    for i in (2, 3):
        fs.copy(f"{base}/0000{i}.tar", f"{bad}/0000{i}.tar")
    exp = experiment(
        tmp_path,
        mlflow_uri,
        data={"train_shards": f"{bad}/{{00000..00003}}.tar"},
        train={"steps": 12, "log_every": 4, "checkpoint_every": 12},
    )
    outcome = run_training(exp)
    metrics = MlflowClient(mlflow_uri).get_run(outcome.mlflow_run_id).data.metrics
    assert metrics["data/skipped_samples"] >= 1
    assert metrics["data/skipped_shards"] >= 1


def test_invalid_config_is_refused_before_any_worker(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        json.dumps(
            {
                "name": "x",
                "data": {"train_shards": "s3://b/{0..1}.tar", "batch_size": -4},
                "model": {"name": "ViT-B-32"},
                "train": {"steps": 10, "lr": 0.1},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "cliplab.cli", "train", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert str(bad) in proc.stderr
    assert "data.batch_size" in proc.stderr and "train.lr: unknown key" in proc.stderr
    assert "Ray" not in proc.stderr and "ray" not in proc.stdout


@pytest.mark.parametrize(("design", "zero", "precision"), [("mlp", 3, "fp32"), ("cls", 2, "bf16")])
def test_holistic_multi_branch_model_trains(ray_local, synth_bucket, tmp_path, mlflow_uri, design, zero, precision):
    slots = ["colour", "shape", "count"]
    exp = experiment(
        tmp_path,
        mlflow_uri,
        objective={"name": "holistic", "diversity": True},
        model={"branches": {"design": design, "count": 3, "mlp_blocks": 1}},
        data={"captions": {"slots": slots}},
        deepspeed={"zero_stage": zero, "precision": precision},
        eval={"max_samples": 63, "batch_size": 31},
    )
    outcome = run_training(exp)

    client = MlflowClient(mlflow_uri)
    run = client.get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.branches.design"] == design
    for key in (
        "loss",
        "loss_branch0",
        "loss_branch2",
        "loss_div",
        "zeroshot/colour/top1",
        "retrieval/i2t_R1",
        "retrieval/colour/i2t_R1",
        "retrieval/count/t2i_R1",
        "branch0/colour/i2t_R1",
        "branch2/count/t2i_R1",
    ):
        assert key in run.data.metrics, key
    assert run.data.metrics["own_caption_frac"] == 1.0
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/branch_retrieval_step00000006.png" in plots

    from cliplab.models.factory import load_exported

    model, pre, cfg = load_exported(f"{outcome.storage}/export")
    assert cfg.branches.count == 3 and pre.image_size == 32
    assert model.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32)
