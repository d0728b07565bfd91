"""`cliplab evaluate`: an exported model (multi-branch included) evaluated in a Ray task, logged to its own run."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cliplab.config import validate_tree
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.errors import ConfigError
from cliplab.eval.offline import evaluate_export, model_location
from cliplab.models.factory import build_model
from cliplab.tracking.mlflow import create_run
from cliplab.train.checkpoint import export_open_clip

VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def experiment(tmp_path: Path, mlflow_uri: str, val: str):
    return validate_tree(
        {
            "name": "offline",
            "data": {"train_shards": val, "val_shards": val, "captions": {"slots": ["colour", "shape"]}},
            "model": {"config": VIT, "branches": {"design": "cls", "count": 2}},
            "train": {"steps": 1},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
            "tracking": {"tracking_uri": mlflow_uri},
            "eval": {
                "max_samples": 24,
                "batch_size": 8,
                "zeroshot": [
                    {
                        "name": "shape",
                        "label_field": "labels.shape",
                        "classnames": ["circle", "square", "triangle", "star", "cross", "diamond"],
                    }
                ],
            },
        }
    )


@pytest.mark.slow
def test_an_export_is_evaluated_and_logged(ray_local, tmp_path, mlflow_uri):
    write_synthscenes(str(tmp_path / "val"), SynthSpec(num_samples=24, samples_per_shard=12, image_size=32))
    exp = experiment(tmp_path, mlflow_uri, f"{tmp_path / 'val'}/{{00000..00001}}.tar")
    model, _ = build_model(exp.model)
    export_open_clip(model.state_dict(), exp, tmp_path / "export")
    source = create_run(exp, mlflow_uri, "trained")
    MlflowClient(mlflow_uri).set_tag(source, "cliplab.model_uri", str(tmp_path / "export"))

    export = model_location(mlflow_uri, None, source)
    metrics, run_id = evaluate_export(exp, export, source)
    assert metrics["eval/n_samples"] == 24
    for key in ("zeroshot/shape/top1", "retrieval/i2t_R1", "retrieval/colour/t2i_R1", "branch1/shape/i2t_R1"):
        assert 0 <= metrics[key] <= 1, key
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["cliplab.evaluates"] == source
    assert run.data.metrics["retrieval/i2t_R1"] == pytest.approx(metrics["retrieval/i2t_R1"])


def test_a_run_without_an_export_is_refused(tmp_path, mlflow_uri):
    exp = experiment(tmp_path, mlflow_uri, "s3://b/{0..1}.tar")
    run = create_run(exp, mlflow_uri, "unfinished")
    with pytest.raises(ConfigError, match=r"no cliplab\.model_uri tag"):
        model_location(mlflow_uri, None, run)
    with pytest.raises(ConfigError, match="give --model"):
        model_location(mlflow_uri, None, None)
    assert model_location(mlflow_uri, "s3://b/export", None) == "s3://b/export"
