"""The embedding benchmark's inputs on local disk: a SynthScenes pool and a tiny random-weight teacher export.

The teacher is a tiny open_clip ViT with random weights: the pass's throughput and memory depend on the model's
size and the data's shape, not on what the weights learned. It is saved as cliplab's export layout (open_clip
checkpoint + `cliplab_model.json`), what `teacher.export` names in a selection config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cliplab.config import ModelConfig
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.models.factory import CHECKPOINT_FILE, MODEL_FILE, build_model

TEACHER = {  # a tiny ViT: 32 px images, 16 patches, 2 blocks per tower
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_teacher(folder: Path) -> Path:
    """Save the tiny random-weight teacher as a cliplab export under `folder`; returns the export folder."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig(config=TEACHER)
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    torch.save({"state_dict": model.state_dict()}, folder / CHECKPOINT_FILE)
    (folder / MODEL_FILE).write_text(cfg.model_dump_json())
    return folder


def write_pool(folder: Path, samples: int, per_shard: int, image_size: int) -> list[str]:
    """Write a SynthScenes pool (30% noisy captions) of `samples` as shards under `folder`; returns their paths."""
    spec = SynthSpec(
        num_samples=samples, samples_per_shard=per_shard, image_size=image_size, noisy_fraction=0.3, seed=1
    )
    return write_synthscenes(str(folder), spec)
