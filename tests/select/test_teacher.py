"""Teacher sources: an MLflow run resolves through its cliplab.model_uri tag; an export gives tau and preprocessing."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from cliplab.errors import ConfigError
from cliplab.select.config import TeacherConfig
from cliplab.select.teacher import TeacherSource, inspect, resolve


def test_run_ids_resolve_to_their_export(mlflow_uri, teacher_export) -> None:
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("t")
    tagged = client.create_run(exp, tags={"cliplab.model_uri": str(teacher_export)}).info.run_id
    bare = client.create_run(exp).info.run_id
    assert resolve(TeacherConfig(run_id=tagged), mlflow_uri) == TeacherSource(export=str(teacher_export))
    with pytest.raises(ConfigError, match=r"has no cliplab\.model_uri tag"):
        resolve(TeacherConfig(run_id=bare), mlflow_uri)
    with pytest.raises(ConfigError, match=r"teacher\.run_id: no run"):
        resolve(TeacherConfig(run_id="f" * 32), mlflow_uri)


def test_an_export_gives_its_temperature_and_preprocessing(teacher_export) -> None:
    info = inspect(TeacherSource(export=str(teacher_export)))
    assert info.tau == pytest.approx(0.07, rel=1e-3) and info.preprocess.image_size == 32
    with pytest.raises(ConfigError, match="not a cliplab export"):
        inspect(TeacherSource(export=str(teacher_export / "nope")))
