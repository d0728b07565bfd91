"""Augmentation: crop boxes reproduce their crops, the flip convention, determinism, open_clip's eval transform."""

from __future__ import annotations

import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from cliplab.config import DataConfig
from cliplab.data.augment import eval_box, eval_view, random_resized_crop, sample_crop, to_tensor, train_view

NORM = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_crop_box_reproduces_the_crop() -> None:
    img = noise_image(60, 40)
    for seed in range(20):
        crop, box = random_resized_crop(img, 16, (0.3, 0.8), (0.75, 1.33), random.Random(seed))
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
        pixel_box = (box[0] * 60, box[1] * 40, box[2] * 60, box[3] * 40)
        again = img.resize((16, 16), Image.Resampling.BICUBIC, box=pixel_box)
        assert np.array_equal(np.asarray(again), np.asarray(crop))


def test_crop_sampling_follows_scale_and_ratio_with_a_centre_fallback() -> None:
    for seed in range(200):
        x0, y0, x1, y1 = sample_crop(100, 80, (0.2, 0.5), (0.75, 4 / 3), random.Random(seed))
        area, aspect = (x1 - x0) * (y1 - y0) / 8000, (x1 - x0) / (y1 - y0)
        assert 0 <= x0 < x1 <= 100 and 0 <= y0 < y1 <= 80
        assert 0.18 < area < 0.52 and 0.7 < aspect < 1.4
    # no crop of a 100x10 strip reaches aspect <= 2: after 10 tries, the widest allowed centre crop
    assert sample_crop(100, 10, (0.9, 1.0), (1.0, 2.0), random.Random(0)) == (40, 0, 60, 10)


def test_train_view_flip_keeps_the_box_in_source_coordinates() -> None:
    img = noise_image(48, 64)
    cfg = DataConfig(train_shards="x.tar", image_size=24, crop_scale=(0.3, 0.9), hflip=True)
    flips = []
    for seed in range(40):
        view = train_view(img, cfg, *NORM, random.Random(seed))
        box = view["crop_box"].tolist()
        crop = img.resize((24, 24), Image.Resampling.BICUBIC, box=(box[0] * 48, box[1] * 64, box[2] * 48, box[3] * 64))
        if view["flip"]:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert view["image"].shape == (3, 24, 24) and view["crop_box"].dtype == torch.float32
        assert torch.allclose(view["image"], to_tensor(crop, *NORM), atol=1e-5)
        flips.append(view["flip"])
    assert 5 < sum(flips) < 35
    no_flip = cfg.model_copy(update={"hflip": False})
    assert not any(train_view(img, no_flip, *NORM, random.Random(s))["flip"] for s in range(20))


def test_views_are_a_pure_function_of_the_rng_seed() -> None:
    img = noise_image(50, 50)
    cfg = DataConfig(train_shards="x.tar", image_size=16, hflip=True)
    a, b = (train_view(img, cfg, *NORM, random.Random(7)) for _ in range(2))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["crop_box"], b["crop_box"]) and a["flip"] == b["flip"]
    c = train_view(img, cfg, *NORM, random.Random(8))
    assert not torch.equal(a["crop_box"], c["crop_box"])


@pytest.mark.parametrize("size", [(64, 48), (40, 90), (33, 33)])
def test_eval_view_is_open_clips_eval_transform(size) -> None:
    img = noise_image(*size)
    reference = open_clip.image_transform(24, is_train=False, mean=NORM[0], std=NORM[1])(img)
    assert torch.allclose(eval_view(img, 24, *NORM), reference)
    x0, y0, x1, y1 = eval_box(*size, 24)
    w, h = size
    assert (x1 - x0) * w == pytest.approx((y1 - y0) * h, rel=0.05)  # a square region of the source
    assert min(x0, y0) >= 0 and max(x1, y1) <= 1 and (x0 == 0 or y0 == 0)
    assert x0 + x1 == pytest.approx(1, abs=0.05) and y0 + y1 == pytest.approx(1, abs=0.05)  # centred
