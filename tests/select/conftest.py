"""A tiny teacher export and a SynthScenes pool on the moto S3 endpoint, shared by the selection tests."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch

from cliplab.config import ModelConfig
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.models.factory import CHECKPOINT_FILE, MODEL_FILE, build_model
from tarfaults import with_garbage_jpg
from tiny_models import tiny_model

TINY = tiny_model(image=32, text_width=32)
SPEC = SynthSpec(num_samples=30, samples_per_shard=10, image_size=32, noisy_fraction=0.3, seed=3)


@pytest.fixture(scope="session")
def teacher_export(tmp_path_factory) -> Path:
    """A cliplab export of a tiny random-init CLIP (what `load_exported` rebuilds)."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = ModelConfig(config=TINY)
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    torch.save({"state_dict": model.state_dict()}, out / CHECKPOINT_FILE)
    (out / MODEL_FILE).write_text(cfg.model_dump_json())
    return out


@pytest.fixture
def synth_pool(s3_bucket) -> dict:
    """3 SynthScenes shards (30 samples, 30% noisy captions) with one garbage jpg in shard 1, plus a missing shard."""
    prefix = f"s3://{s3_bucket}/pool"
    urls = write_synthscenes(prefix, SPEC)
    fs = fsspec.filesystem("s3")
    path = urls[1].removeprefix("s3://")
    fs.pipe_file(path, with_garbage_jpg(fs.cat_file(path), nth=2))
    return {
        "bucket": s3_bucket,
        "urls": urls,
        "spec": f"{prefix}/{{00000..00003}}.tar",  # 00003 does not exist: an unreadable shard
        "target": write_synthscenes(f"s3://{s3_bucket}/target", SPEC.model_copy(update={"num_samples": 8, "seed": 9})),
    }
