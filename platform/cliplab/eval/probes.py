"""Misalignment probe (issue 3, mcd.md): does the image-caption distance track how much a crop removed?

Each held-out image is cropped to square windows of known area fraction a (1.0 ... 0.2) at a seeded
position. For every crop we record the model's distance D = ||z_crop - u||^2 to the caption embedding,
(a) the augmentation-derived misalignment 1 - a (the crop-content loss against the full image, as in
mcd.md eq. (2)), and (b) the ground-truth share of the caption's objects that the crop removed (an
object counts as removed when less than half of its box stays inside the crop; SynthScenes json).
Spearman correlations of D with (a) and (b) are the probe's result.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from scipy.stats import spearmanr

from cliplab.data.augment import to_tensor
from cliplab.data.pipeline import held_out_samples, stable_seed
from cliplab.eval.zeroshot import lookup

AREAS = (1.0, 0.8, 0.6, 0.45, 0.3, 0.2)


def crop_for(width: int, height: int, area: float, rng: random.Random) -> tuple[int, int, int, int]:
    """A square window covering `area` of the image, at a random position."""
    side = math.sqrt(area * width * height)
    side = min(side, width, height)
    x0 = rng.uniform(0, width - side)
    y0 = rng.uniform(0, height - side)
    return round(x0), round(y0), round(x0 + side), round(y0 + side)


def removed_share(objects: Sequence[dict[str, Any]], box: tuple[int, int, int, int]) -> float:
    """Share of objects with less than half of their box inside the crop (NaN without object boxes)."""
    if not objects:
        return float("nan")
    removed = 0
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        ix = max(0, min(x1, box[2]) - max(x0, box[0]))
        iy = max(0, min(y1, box[3]) - max(y0, box[1]))
        removed += ix * iy < 0.5 * max(1, (x1 - x0) * (y1 - y0))
    return removed / len(objects)


@torch.no_grad()
def misalignment_probe(
    model: Any,
    tokenizer: Any,
    spec: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    caption_key: str,
    rank: int,
    world_size: int,
    max_images: int,
    device: torch.device,
    caption_field: str = "captions.long",
    seed: int = 0,
) -> dict[str, Any]:
    """Spearman correlations and the (distance, scale, share) points of every crop, gathered on every rank."""
    rows: list[tuple[float, float, float]] = []
    for key, img, caption, meta in held_out_samples(spec, caption_key, rank, world_size, max_images):
        caption = lookup(meta, caption_field) or caption
        rng = random.Random(stable_seed(seed, "probe", key))
        boxes = [crop_for(img.width, img.height, a, rng) for a in AREAS]
        crops = torch.stack(
            [to_tensor(img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=b), mean, std) for b in boxes]
        ).to(device)
        z = model.encode_image(crops, normalize=True).float()
        u = model.encode_text(tokenizer([caption]).to(device), normalize=True).float()
        cos = (z @ u[0]).mean(-1) if z.ndim == 3 else z @ u[0]  # multi-branch: mean over branches
        for a, b, c in zip(AREAS, boxes, cos.cpu().tolist(), strict=True):
            rows.append((2 - 2 * c, 1 - a, removed_share(meta.get("objects", []), b)))
    parts = [rows]
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, rows)
    points = np.array([r for p in parts for r in p], dtype=np.float64).reshape(-1, 3)
    has_share = ~np.isnan(points[:, 2])
    return {
        "probe/spearman_scale": float(spearmanr(points[:, 0], points[:, 1]).statistic),
        "probe/spearman_content": float(spearmanr(points[has_share, 0], points[has_share, 2]).statistic)
        if has_share.sum() > 2
        else float("nan"),
        "probe/n_crops": float(len(points)),
        "points": points,
    }
