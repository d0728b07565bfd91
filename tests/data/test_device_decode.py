"""data.decode: device: the device path makes the CPU path's train view (decode, crop, flip, normalise)."""

from __future__ import annotations

import io
import random

import numpy as np
import torch
import webdataset as wds
from loader_setup import TOK
from loader_setup import cfg as loader_cfg
from PIL import Image

from cliplab.config import DataConfig
from cliplab.data.augment import sample_crop
from cliplab.data.device_decode import DeviceDecoder, resized_crop
from cliplab.data.pipeline import make_train_loader

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
LEVEL = 1 / 255 / min(STD)  # one 8-bit level after normalisation


def cfg(spec: str, **kw) -> DataConfig:
    return loader_cfg(spec, **{"batch_size": 12, "shuffle_buffer": 10, "hflip": True, "crop_scale": (0.2, 1.0), **kw})


def batches(c: DataConfig, n: int) -> list[dict]:
    loader, _ = make_train_loader(
        c, TOK, MEAN, STD, 0, 1, None, frozenset({"image", "text", "crop_box", "flip", "key"})
    )
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_device_path_makes_the_cpu_path_images(shards) -> None:
    decoder = DeviceDecoder(32, MEAN, STD, torch.device("cpu"))
    cpu, device = batches(cfg(shards), 4), batches(cfg(shards, decode="device"), 4)
    for a, b in zip(cpu, device, strict=True):
        assert "image" not in b and b["jpeg"].dtype == torch.uint8 and b["jpeg_meta"].shape == (12, 7)
        assert a["key"] == b["key"] and torch.equal(a["crop_box"], b["crop_box"]) and torch.equal(a["flip"], b["flip"])
        made = decoder(b)["image"]
        diff = (made - a["image"]).abs()
        # same libjpeg-turbo decode and PIL's resampling arithmetic: equal but for PIL's pass order, where an
        # 8-bit rounding between the passes can differ by a level or two on these smooth images
        assert diff.max() <= 3 * LEVEL + 1e-6 and diff.mean() <= 0.05 * LEVEL, (diff.max() / LEVEL, diff.mean() / LEVEL)


def test_resized_crop_is_pils_bicubic_box_resize() -> None:
    rng = random.Random(0)
    for trial in range(12):
        w, h = rng.randint(24, 120), rng.randint(24, 120)
        smooth = np.linspace(0, 255, w * h * 3).reshape(h, w, 3) + np.random.RandomState(trial).rand(h, w, 3) * 40
        img = Image.fromarray(smooth.clip(0, 255).astype(np.uint8))
        box = sample_crop(w, h, (0.08, 1.0), (0.75, 1.33), rng)
        size = rng.choice([16, 32, 64])
        ref = torch.from_numpy(np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box)).copy())
        got = resized_crop(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), box, size)
        assert (got - ref.permute(2, 0, 1).double()).abs().max() <= 3, (w, h, box, size)


def test_png_falls_back_to_cpu_decode_and_a_broken_jpeg_costs_only_its_row(tmp_path, caplog) -> None:
    with wds.TarWriter(str(tmp_path / "00000.tar")) as w:
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), (60 * i, 80, 200)).save(buf, format="PNG" if i % 2 else "JPEG")
            data = buf.getvalue()
            if i == 2:
                data = data[: data.index(b"\xff\xda") + 16]  # a valid header, a truncated body
            w.write({"__key__": f"{i:04d}", "jpg" if i % 2 == 0 else "png": data, "txt": f"c{i}", "json": "{}"})
    c = cfg(f"{tmp_path}/00000.tar", batch_size=4, shuffle_buffer=0, hflip=False)
    (b,) = batches(c.model_copy(update={"decode": "device"}), 1)
    assert b["jpeg_meta"][:, 0].tolist() == [0, 2] and b["decoded"].shape == (2, 3, 32, 32)
    image = DeviceDecoder(32, MEAN, STD, torch.device("cpu"))(b)["image"]
    assert image.shape == (4, 3, 32, 32)
    assert torch.equal(image[2], torch.zeros(3, 32, 32)) and "undecodable JPEG" in caplog.text
    (cpu,) = batches(c, 1)
    assert cpu["key"][:2] == ["0000", "0001"]  # the CPU path drops the broken sample
    assert torch.equal(image[1], cpu["image"][1]) and (image[0] - cpu["image"][0]).abs().max() <= 3 * LEVEL + 1e-6


def test_the_workers_device_copy_decodes_first_and_casts_the_image(shards) -> None:
    from cliplab.train.worker import Worker, device_decoder

    c = cfg(shards, decode="device")
    worker = Worker(0, 1, torch.device("cpu"), torch.bfloat16)
    (batch,) = batches(c, 1)
    out = worker.to_device(batch, device_decoder(c, MEAN, STD, worker))
    assert {"jpeg", "jpeg_meta"}.isdisjoint(out) and out["image"].dtype == torch.bfloat16
    assert out["image"].shape == (12, 3, 32, 32) and out["text"].dtype == batch["text"].dtype
    assert device_decoder(cfg(shards), MEAN, STD, worker) is None
