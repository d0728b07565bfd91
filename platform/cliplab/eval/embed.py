"""Embed held-out batches on every worker and gather them so each worker holds the same global arrays."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("cliplab.eval")
LISTS = ("key", "json", "caption", "slot_texts")


@torch.no_grad()
def embed_batches(model: Any, batches: Iterable[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Image features (N, D) or (N, M, D), text features (N, D), keys and json of all workers, sorted by key.

    Batches with caption slots (`texts`, (B, C, L)) also give `texts`, (N, C, D). The per-sample lists
    (`key`, `json`, and `caption`, `slot_texts` where batches have them) come along in the same order.
    Collective under torch.distributed: every worker calls it, also one whose share is empty.
    """
    images, texts, slots = [], [], []
    lists: dict[str, list[Any]] = {}
    for batch in batches:
        images.append(model.encode_image(batch["image"].to(device), normalize=True).float().cpu())
        texts.append(model.encode_text(batch["text"].to(device), normalize=True).float().cpu())
        if "texts" in batch:
            tokens = batch["texts"]
            flat = model.encode_text(tokens.flatten(0, 1).to(device), normalize=True).float().cpu()
            slots.append(flat.unflatten(0, tokens.shape[:2]))
        for name in LISTS:
            if name in batch:
                lists.setdefault(name, []).extend(batch[name])
    local = {
        "image": torch.cat(images) if images else None,
        "text": torch.cat(texts) if texts else None,
        "texts": torch.cat(slots) if slots else None,
        **lists,
    }
    parts = [local]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    parts = [p for p in parts if p["image"] is not None]
    if not parts:
        raise ValueError("no held-out samples were embedded on any worker")
    order = sorted(range(sum(len(p["key"]) for p in parts)), key=lambda i: _flat(parts, "key")[i])
    out = {
        "image": torch.cat([p["image"] for p in parts])[order],
        "text": torch.cat([p["text"] for p in parts])[order],
        "texts": torch.cat([p["texts"] for p in parts])[order] if parts[0]["texts"] is not None else None,
    }
    for name in LISTS:
        if name in parts[0]:
            values = _flat(parts, name)
            out[name] = [values[i] for i in order]
    log.info("embedded %d held-out samples", len(out["key"]))
    return out


def _flat(parts: list[dict[str, Any]], field: str) -> list[Any]:
    return [x for p in parts for x in p[field]]
