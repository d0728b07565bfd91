"""Image augmentations that record their geometry, so objectives can reason about what a view shows.

Crop boxes are (x0, y0, x1, y1) normalised to the source image, always in the source's coordinates:
a horizontal flip is recorded as a separate flag and does not change the box.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from cliplab.config import DataConfig

Box = tuple[float, float, float, float]


def sample_crop(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop): pixel box (x0, y0, x1, y1)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.randint(0, width - w)
            y0 = rng.randint(0, height - h)
            return x0, y0, x0 + w, y0 + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def random_resized_crop(
    img: Image.Image, size: int, scale: Sequence[float], ratio: Sequence[float], rng: random.Random
) -> tuple[Image.Image, Box]:
    """A random crop resized to size x size, and its box normalised to the source image."""
    x0, y0, x1, y1 = sample_crop(img.width, img.height, scale, ratio, rng)
    crop = img.resize((size, size), Image.Resampling.BICUBIC, box=(x0, y0, x1, y1))
    return crop, (x0 / img.width, y0 / img.height, x1 / img.width, y1 / img.height)


def to_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(img), mean, std)


def draw_train_view(
    width: int, height: int, cfg: DataConfig, rng: random.Random
) -> tuple[tuple[int, int, int, int], bool]:
    """The train view's geometry (pixel crop box, mirrored?) drawn from `rng`: shared by CPU and device decode."""
    box = sample_crop(width, height, cfg.crop_scale, cfg.crop_ratio, rng)
    return box, cfg.hflip and rng.random() < 0.5


def normalised_box(box: tuple[int, int, int, int], width: int, height: int) -> torch.Tensor:
    """A pixel box as (x0, y0, x1, y1) fractions of the source image."""
    return torch.tensor((box[0] / width, box[1] / height, box[2] / width, box[3] / height), dtype=torch.float32)


def train_view(
    img: Image.Image, cfg: DataConfig, mean: Sequence[float], std: Sequence[float], rng: random.Random
) -> dict:
    """One augmented view: normalised tensor, its crop box and whether it was mirrored."""
    box, flip = draw_train_view(img.width, img.height, cfg, rng)
    crop = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC, box=box)
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return {"image": to_tensor(crop, mean, std), "crop_box": normalised_box(box, img.width, img.height), "flip": flip}


def misaligned_view(
    img: Image.Image, cfg: DataConfig, mean: Sequence[float], std: Sequence[float], rng: random.Random
) -> dict:
    """An MCD view (cfg.views): wide-range crop, flip, optional colour jitter; `jitter` is its strength in [0, 1]."""
    v = cfg.views
    crop, box = random_resized_crop(img, cfg.image_size, v.crop_scale, v.crop_ratio, rng)
    flip = v.hflip and rng.random() < 0.5
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    jitter = 0.0
    if v.colour_jitter > 0:
        factors = [rng.uniform(1 - v.colour_jitter, 1 + v.colour_jitter) for _ in range(3)]
        crop = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(crop, factors[0]), factors[1]), factors[2])
        jitter = sum(abs(f - 1) for f in factors) / (3 * v.colour_jitter)
    return {
        "image": to_tensor(crop, mean, std),
        "crop_box": torch.tensor(box, dtype=torch.float32),
        "flip": flip,
        "jitter": jitter,
    }


def eval_view(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """open_clip's eval transform: resize the shorter side, centre crop, normalise."""
    img = TF.center_crop(TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC), size)
    return to_tensor(img, mean, std)
