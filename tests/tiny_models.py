"""The tiny open_clip model configs the tests train (seconds per step on CPU), built in one place."""

from __future__ import annotations

from typing import Any


def tiny_model(
    embed: int = 16,
    image: int = 16,
    patch: int = 8,
    width: int = 32,
    text_width: int = 16,
    context: int = 16,
    heads: int = 2,
) -> dict[str, Any]:
    """A one-layer ViT and one-layer text transformer (open_clip's CLIP config schema, full BPE vocabulary)."""
    return {
        "embed_dim": embed,
        "vision_cfg": {"image_size": image, "patch_size": patch, "width": width, "layers": 1, "head_width": width // 2},
        "text_cfg": {"context_length": context, "vocab_size": 49408, "width": text_width, "heads": heads, "layers": 1},
    }
