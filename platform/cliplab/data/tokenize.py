"""Tokenizers from open_clip, chosen by the model config (named models or inline configs)."""

from __future__ import annotations

from collections.abc import Callable

import open_clip
import torch

from cliplab.config import ModelConfig

Tokenizer = Callable[[list[str]], torch.Tensor]


def build_tokenizer(model: ModelConfig) -> Tokenizer:
    """open_clip's tokenizer for a named model; the CLIP BPE tokenizer at the inline config's context length."""
    if model.name is not None:
        return open_clip.get_tokenizer(model.name)
    context = int(model.config["text_cfg"].get("context_length", 77))
    return open_clip.SimpleTokenizer(context_length=context)
