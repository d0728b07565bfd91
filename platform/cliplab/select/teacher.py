"""The frozen teacher: where its weights are (open_clip name + checkpoint, cliplab export, MLflow run) and loading it.

The driver resolves the source once (an MLflow run id becomes the export its `cliplab.model_uri` tag
names) and loads the model to read its preprocessing and temperature; every embedding actor then
loads the same resolved source itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mlflow.tracking import MlflowClient

from cliplab.config import ModelConfig
from cliplab.data.tokenize import Tokenizer, build_tokenizer
from cliplab.errors import ConfigError
from cliplab.models.factory import Preprocess, build_model, load_exported
from cliplab.select.config import TeacherConfig
from cliplab.select.scores import teacher_tau
from cliplab.tracking.mlflow import MODEL_URI_TAG


@dataclass(frozen=True)
class TeacherSource:
    """A resolved teacher: an export URI, or an open_clip name with a local checkpoint."""

    export: str | None = None
    name: str | None = None
    checkpoint: str | None = None

    def describe(self) -> str:
        return self.export or f"{self.name}:{self.checkpoint}"


@dataclass(frozen=True)
class TeacherInfo:
    """What the pipeline needs from the teacher besides its weights."""

    source: TeacherSource
    preprocess: Preprocess
    tau: float  # the teacher's own 1 / exp(logit_scale)


def resolve(cfg: TeacherConfig, tracking_uri: str) -> TeacherSource:
    """The teacher's weights as an export URI or name + checkpoint (an MLflow run is looked up by its tag)."""
    if cfg.run_id is None:
        return TeacherSource(export=cfg.export, name=cfg.name, checkpoint=cfg.checkpoint)
    try:
        tags = MlflowClient(tracking_uri).get_run(cfg.run_id).data.tags
    except Exception as exc:
        raise ConfigError(f"teacher.run_id: no run {cfg.run_id} at {tracking_uri} ({exc})") from None
    if MODEL_URI_TAG not in tags:
        raise ConfigError(f"teacher.run_id: run {cfg.run_id} has no {MODEL_URI_TAG} tag (did it finish training?)")
    return TeacherSource(export=tags[MODEL_URI_TAG])


def load(source: TeacherSource) -> tuple[torch.nn.Module, Preprocess, Tokenizer]:
    """The teacher in eval mode, its preprocessing constants and tokenizer."""
    if source.export is not None:
        model, pre, mcfg = load_exported(source.export)
    else:
        mcfg = ModelConfig(name=source.name, pretrained=source.checkpoint)
        model, pre = build_model(mcfg)
    return model.eval(), pre, build_tokenizer(mcfg)


def inspect(source: TeacherSource) -> TeacherInfo:
    """Load the teacher once on the driver for its preprocessing and temperature."""
    model, pre, _ = load(source)
    return TeacherInfo(source, pre, teacher_tau(model.logit_scale))
