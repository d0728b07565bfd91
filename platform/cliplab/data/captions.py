"""Multi-caption samples: the ordered caption slots of one image, and which of them are its own.

holistic.md "Inputs and outputs": an image comes with captions [c_1 ... c_M] whose position fixes the
branch they train. Foreign data may lack some slots; a missing slot takes the sample's plain caption and
is flagged, so the loss matches it freely to a branch (holistic.md "Losses" 5) instead of to the
slot's branch.
"""

from __future__ import annotations

from typing import Any

import torch

from cliplab.config import CaptionsConfig
from cliplab.data.tokenize import Tokenizer

PLAIN = "txt"


def caption_slots(caption: str, meta: dict[str, Any], cfg: CaptionsConfig) -> tuple[list[str], list[bool]]:
    """(one caption per slot, whether each is the sample's own caption for that slot)."""
    source = meta.get(cfg.field)
    texts, own = [], []
    for position, slot in enumerate(cfg.slots):
        if slot == PLAIN:
            value: Any = caption
        elif isinstance(source, dict):
            value = source.get(slot)
        elif isinstance(source, list) and position < len(source):
            value = source[position]
        else:
            value = None
        ok = isinstance(value, str) and bool(value.strip())
        texts.append(value.strip() if ok else caption)
        own.append(ok)
    return texts, own


def tokenize_slots(rows: list[tuple[list[str], list[bool]]], tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """`texts` (B, C, L) token ids and `caption_own` (B, C) bool for a batch of `caption_slots` results."""
    slots = len(rows[0][0])
    tokens = tokenizer([t for texts, _ in rows for t in texts])
    return {
        "texts": tokens.view(len(rows), slots, -1),
        "caption_own": torch.tensor([own for _, own in rows], dtype=torch.bool),
    }
