"""The train loop's units, each alone: step metrics and the progress line, fault injection, device transfer,
the rank-0 export to storage (a real MLflow store, a real open_clip reload), orphaned temp checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys

import open_clip
import pytest
import torch
from mlflow.tracking import MlflowClient

from cliplab.config import validate_tree
from cliplab.models.factory import build_model
from cliplab.tracking.mlflow import MODEL_URI_TAG, RunLogger, create_run
from cliplab.train import checkpoint
from cliplab.train.export import export_model
from cliplab.train.faults import InjectedCrash, inject_crash
from cliplab.train.step_metrics import progress_line, step_metrics
from cliplab.train.worker import Worker
from tiny_models import tiny_model


def experiment(**train):
    return validate_tree(
        {
            "name": "units",
            "data": {"train_shards": "x/{0..1}.tar", "batch_size": 4},
            "model": {"config": tiny_model(context=8)},
            "train": {"steps": 10, **train},
            "scaling": {"num_workers": 1},
        }
    )


def test_step_metrics_on_one_worker_carry_losses_rates_health_and_flops() -> None:
    m = step_metrics(
        {"loss": 2.5, "loss_mcd": 0.5},
        lr=1e-3,
        logit_scale=14.3,
        rates={"samples_per_s": 100.0, "data_wait_frac": 0.02},
        skipped={"samples": 3, "shards": 1},
        flops=2e9,
        peak=1e12,
        world=1,
    )
    assert m == {
        "loss": 2.5,
        "loss_mcd": 0.5,
        "samples_per_s": 100.0,
        "data_wait_frac": 0.02,
        "data/skipped_samples": 3.0,
        "data/skipped_shards": 1.0,
        "lr": 1e-3,
        "logit_scale": 14.3,
        "tflops_per_s": pytest.approx(0.2),
        "mfu": pytest.approx(0.2),
    }
    unknown = step_metrics({"loss": 1.0}, 1e-3, 1.0, {"samples_per_s": 1.0}, {}, None, 1e12, 1)
    assert "tflops_per_s" not in unknown and "mfu" not in unknown and unknown["data/skipped_samples"] == 0


def test_progress_line_shows_the_headline_numbers_only() -> None:
    line = progress_line(
        3,
        10,
        {
            "loss": 1.23456,
            "lr": 2e-4,
            "samples_per_s": 812.4,
            "data_wait_frac": 0.051,
            "tflops_per_s": 152.04,
            "mfu": 0.3142,
            "zeroshot/colour/top1": 0.5,
            "zeroshot/colour/top5": 0.9,
            "retrieval/i2t_R1": 0.25,
            "retrieval/caption/i2t_R1": 0.2,
        },
    )
    assert line == (
        "step 3/10 | loss 1.2346 | lr 2.00e-04 | samples_per_s 812 | data_wait_frac 5% | tflops_per_s 152 | "
        "mfu 31.4% | zeroshot/colour/top1 0.500 | retrieval/i2t_R1 0.250"
    )


def test_the_injected_crash_fires_once_at_its_step_and_never_after_a_resume() -> None:
    exp = experiment(crash_at_step=4)
    inject_crash(exp, 3, resumed=False)
    with pytest.raises(InjectedCrash, match="crash_at_step=4"):
        inject_crash(exp, 4, resumed=False)
    inject_crash(exp, 4, resumed=True)
    inject_crash(experiment(), 4, resumed=False)


def test_batches_reach_the_device_with_images_in_the_compute_dtype() -> None:
    worker = Worker(rank=0, world=1, device=torch.device("cpu"), dtype=torch.bfloat16)
    batch = {"image": torch.zeros(2, 3, 4, 4), "text": torch.ones(2, 8, dtype=torch.long), "key": ["a", "b"]}
    out = worker.to_device(batch)
    assert out["image"].dtype == torch.bfloat16 and out["text"].dtype == torch.long and out["key"] == ["a", "b"]


def test_export_writes_an_open_clip_checkpoint_and_tags_the_run(tmp_path, mlflow_uri) -> None:
    exp = experiment()
    torch.manual_seed(0)
    model, _ = build_model(exp.model)
    run_id = create_run(exp, mlflow_uri, "export-unit")
    export_dir = str(tmp_path / "export")
    export_model(model.state_dict(), exp, RunLogger(mlflow_uri, run_id), export_dir)

    tags = MlflowClient(mlflow_uri).get_run(run_id).data.tags
    assert tags[MODEL_URI_TAG] == export_dir
    name = tags["cliplab.open_clip_name"]
    open_clip.add_model_config(str(tmp_path / "export" / f"{name}.json"))
    weights = str(tmp_path / "export" / "open_clip_model.pt")
    reloaded, _, _ = open_clip.create_model_and_transforms(name, pretrained=weights)
    text = torch.randint(1, 400, (2, 8))
    with torch.no_grad():
        assert torch.allclose(reloaded.encode_text(text), model.encode_text(text), atol=1e-6)


def test_temp_checkpoints_of_dead_workers_are_removed_and_live_ones_kept(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"{checkpoint.TEMP_PREFIX}{dead.pid}-12-abcd"
    mine = tmp_path / f"{checkpoint.TEMP_PREFIX}{os.getpid()}-12-efgh"
    other = tmp_path / "cliplab-ckpt-notapid"
    for path in (orphan, mine, other):
        (path / "ds").mkdir(parents=True)
    assert checkpoint.remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and mine.exists() and other.exists()
