"""What the data tests share: the tiny tokenizer, a normalisation and a loader config over given shards."""

from __future__ import annotations

from cliplab.config import DataConfig, ModelConfig
from cliplab.data.tokenize import build_tokenizer

TOK = build_tokenizer(ModelConfig(config={"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"context_length": 16}}))
NORM = ((0.5,) * 3, (0.5,) * 3)
SAMPLES, PER_SHARD = 240, 30  # the `shards` fixture's SynthScenes set: 8 shards


def cfg(spec: str, **kw) -> DataConfig:
    """A single-process loader config (batch 8, shuffle buffer 20, 32 px) over `spec`, with `kw` on top."""
    base = {"train_shards": spec, "batch_size": 8, "num_workers": 0, "shuffle_buffer": 20, "image_size": 32}
    return DataConfig(**{**base, **kw})
