"""MLflow side of a run: the experiment opens as model training, the export is a loadable registered model."""

from __future__ import annotations

import io
import os

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from cliplab.config import validate_tree
from cliplab.data.augment import eval_view
from cliplab.data.tokenize import build_tokenizer
from cliplab.models.factory import build_model
from cliplab.tracking.mlflow import EXPERIMENT_KIND, create_run, ui_hint
from cliplab.tracking.registry import register_export, using_tracking_uri
from cliplab.train.checkpoint import export_open_clip
from tiny_models import tiny_model

TINY = tiny_model(context=8)


def experiment(experiment_name: str = "reg"):
    return validate_tree(
        {
            "name": "reg",
            "data": {"train_shards": "x/{0..1}.tar"},
            "model": {"config": TINY},
            "train": {"steps": 1},
            "tracking": {"experiment": experiment_name},
        }
    )


def test_experiments_open_in_the_model_training_view(mlflow_uri) -> None:
    client = MlflowClient(mlflow_uri)
    create_run(experiment(), mlflow_uri, "r1")
    assert client.get_experiment_by_name("reg").tags["mlflow.experimentKind"] == "custom_model_development"
    mine = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    kindless = client.create_experiment("old")
    create_run(experiment("chosen"), mlflow_uri, "r2")
    create_run(experiment("old"), mlflow_uri, "r3")
    assert client.get_experiment(mine).tags["mlflow.experimentKind"] == "genai_development"  # the user's choice
    assert client.get_experiment(kindless).tags["mlflow.experimentKind"] == EXPERIMENT_KIND["mlflow.experimentKind"]


def test_export_is_a_registered_model_that_embeds_like_the_trained_one(mlflow_uri, tmp_path) -> None:
    before = os.environ.get("MLFLOW_TRACKING_URI")
    exp = experiment()
    torch.manual_seed(0)
    model, pre = build_model(exp.model)
    model.eval()
    export_open_clip(model.state_dict(), exp, tmp_path / "export")
    run_id = create_run(exp, mlflow_uri, "r")

    assert register_export(mlflow_uri, run_id, str(tmp_path / "export"), "cliplab-reg") == 1
    assert register_export(mlflow_uri, run_id, str(tmp_path / "export"), "cliplab-reg") == 2
    version = MlflowClient(mlflow_uri).get_model_version("cliplab-reg", "2")
    assert version.run_id == run_id

    with using_tracking_uri(mlflow_uri):
        loaded = mlflow.pyfunc.load_model("models:/cliplab-reg/2")
    assert os.environ.get("MLFLOW_TRACKING_URI") == before, "no tracking URI is left behind for later runs"
    texts = ["a red circle", "two blue squares"]
    with torch.no_grad():
        expected_text = model.encode_text(build_tokenizer(exp.model)(texts), normalize=True).numpy()
    assert loaded.predict(pd.DataFrame({"text": texts})) == pytest.approx(expected_text, abs=1e-5)

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with torch.no_grad():
        pixels = eval_view(img, pre.image_size, pre.mean, pre.std)[None]
        expected_image = model.encode_image(pixels, normalize=True).numpy()
    assert loaded.predict(pd.DataFrame({"image": [buf.getvalue()]})) == pytest.approx(expected_image, abs=1e-5)
    with pytest.raises(ValueError, match="'text' column"):
        loaded.predict(pd.DataFrame({"caption": texts}))


def test_the_ui_hint_opens_the_run_in_the_model_training_view(mlflow_uri) -> None:
    run_id = create_run(experiment(), mlflow_uri, "r")
    experiment_id = MlflowClient(mlflow_uri).get_run(run_id).info.experiment_id
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    assert ui_hint(mlflow_uri, run_id) == (
        f"mlflow ui --backend-store-uri {mlflow_uri}   then open http://127.0.0.1:5000/{page}"
    )
