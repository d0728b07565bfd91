"""SynthScenes: synthetic image-text shards with ground truth, in img2dataset's WebDataset layout.

Each image shows one large shape and 0-3 small ones (6 shapes x 8 colours x 2 sizes, random positions)
on a plain grey background. `.txt` is a short web-like caption; `.json` carries the ground truth the
later objectives and evaluations rely on: every object's shape, colour, size and box, labels of the
largest object, captions from several perspectives, and a `noisy` flag for samples whose `.txt`
belongs to another image. Everything is a pure function of (seed, index): same seed, same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

from cliplab.data.shards import write_shards

log = logging.getLogger("cliplab.data.synth")

SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
COLOURS = {
    "red": (215, 25, 30),
    "green": (20, 160, 40),
    "blue": (25, 60, 215),
    "yellow": (245, 215, 0),
    "purple": (130, 30, 170),
    "orange": (250, 125, 0),
    "black": (15, 15, 15),
    "white": (250, 250, 250),
}
SIZES = {"large": (0.42, 0.58), "small": (0.18, 0.26)}
SUPERSAMPLE = 4
NUMBERS = ["zero", "one", "two", "three", "four"]


class SynthSpec(BaseModel):
    """What to generate; the dataset is a pure function of these fields."""

    model_config = ConfigDict(extra="forbid")
    num_samples: int = Field(gt=0)
    samples_per_shard: int = Field(1000, gt=0)
    image_size: int = Field(64, ge=16)
    noisy_fraction: float = Field(0.0, ge=0, le=1)
    seed: int = 0
    min_objects: int = Field(1, ge=1, le=4)
    max_objects: int = Field(4, ge=1, le=4)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def where(self) -> str:
        """Coarse position from the box centre in thirds of a unit image."""
        cx, cy = (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2
        return _thirds(cx, cy)


def _thirds(cx: float, cy: float) -> str:
    col = ["left", "centre", "right"][min(2, int(cx * 3))]
    row = ["top", "middle", "bottom"][min(2, int(cy * 3))]
    if col == "centre" and row == "middle":
        return "centre"
    return f"{row} {col}" if row != "middle" else col if col != "centre" else row


def _rng(spec: SynthSpec, index: int, stream: str) -> random.Random:
    return random.Random(f"synthscenes-{spec.seed}-{index}-{stream}")


def scene(spec: SynthSpec, index: int) -> tuple[list[Obj], tuple[int, int, int], list[tuple[float, float]]]:
    """The objects (largest first), background colour and unit-square centres of sample `index`."""
    rng = _rng(spec, index, "scene")
    s = spec.image_size
    n = rng.randint(spec.min_objects, spec.max_objects)
    grey = rng.randint(105, 150)
    background = (grey + rng.randint(-8, 8), grey + rng.randint(-8, 8), grey + rng.randint(-8, 8))
    objects: list[Obj] = []
    centres: list[tuple[float, float]] = []
    for i in range(n):
        size = "large" if i == 0 else "small"
        side = rng.uniform(*SIZES[size])
        for _ in range(20):
            cx, cy = rng.uniform(side / 2, 1 - side / 2), rng.uniform(side / 2, 1 - side / 2)
            if all(
                abs(cx - ox) > (side + os) / 2 or abs(cy - oy) > (side + os) / 2
                for (ox, oy), os in zip(centres, [_side(o, s) for o in objects], strict=True)
            ):
                break
        box = (
            round((cx - side / 2) * s),
            round((cy - side / 2) * s),
            round((cx + side / 2) * s),
            round((cy + side / 2) * s),
        )
        objects.append(Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), size, box))
        centres.append((cx, cy))
    return objects, background, centres


def _side(o: Obj, s: int) -> float:
    return (o.box[2] - o.box[0]) / s


def _polygon(shape: str, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + w / 2, y0 + h / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":
        import math

        pts = []
        for k in range(10):
            r = (w / 2) if k % 2 == 0 else (w / 5)
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts
    if shape == "cross":
        t = w / 6
        return [
            (cx - t, y0),
            (cx + t, y0),
            (cx + t, cy - t),
            (x1, cy - t),
            (x1, cy + t),
            (cx + t, cy + t),
            (cx + t, y1),
            (cx - t, y1),
            (cx - t, cy + t),
            (x0, cy + t),
            (x0, cy - t),
            (cx - t, cy - t),
        ]
    raise ValueError(shape)


def draw(spec: SynthSpec, objects: list[Obj], background: tuple[int, int, int]) -> bytes:
    """Render supersampled, then downsample for clean edges; JPEG bytes."""
    big = spec.image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), background)
    pen = ImageDraw.Draw(img)
    for obj in reversed(objects):  # largest last, so it stays fully visible
        x0, y0, x1, y1 = (c * SUPERSAMPLE for c in obj.box)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            inset = (x1 - x0) * 0.08
            pen.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
        else:
            pen.polygon(_polygon(obj.shape, x0, y0, x1, y1), fill=fill)
    small = img.resize((spec.image_size, spec.image_size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _name(o: Obj, with_size: bool = False) -> str:
    return f"{o.size} {o.colour} {o.shape}" if with_size else f"{o.colour} {o.shape}"


def web_caption(spec: SynthSpec, index: int, objects: list[Obj]) -> str:
    """A short, varied, web-like caption naming the largest object first."""
    rng = _rng(spec, index, "caption")
    main, rest = objects[0], objects[1:]
    templates = [
        lambda: f"a {_name(main)}",
        lambda: f"{_name(main, True)}" + (f" with a {_name(rest[0])}" if rest else ""),
        lambda: f"photo of a {_name(main)}" + (f" and {NUMBERS[len(rest)]} small shapes" if rest else ""),
        lambda: f"{main.colour} {main.shape} on grey" + (", " + ", ".join(_name(o) for o in rest) if rest else ""),
        lambda: f"big {main.shape}, {main.colour}" + (f", next to a {rest[0].shape}" if rest else ""),
        lambda: f"the {main.colour} {main.shape}" + (" and others" if rest else " alone"),
    ]
    return rng.choice(templates)()


def perspective_captions(objects: list[Obj], s: int) -> dict[str, str]:
    """Ground-truth captions from several perspectives (colour, shape, layout, count, long)."""
    main = objects[0]
    unit = [Obj(o.shape, o.colour, o.size, tuple(c / s for c in o.box)) for o in objects]
    colours = list(dict.fromkeys(o.colour for o in objects))
    shapes = list(dict.fromkeys(o.shape for o in objects))
    layout = ", ".join(f"a {o.shape} at the {u.where}" for o, u in zip(objects, unit, strict=True))
    long = "; ".join(f"a {_name(o, True)} at the {u.where}" for o, u in zip(objects, unit, strict=True))
    return {
        "colour": " and ".join(colours) + (" colours" if len(colours) > 1 else " colour"),
        "shape": " and ".join(shapes) + (" shapes" if len(shapes) > 1 else " shape"),
        "layout": layout,
        "count": f"{NUMBERS[len(objects)]} object{'s' if len(objects) > 1 else ''}: "
        + ", ".join(o.shape for o in objects),
        "long": f"A grey image showing {long}. The largest object is a {main.colour} {main.shape}.",
    }


def uid(spec: SynthSpec, index: int) -> str:
    return hashlib.sha1(f"synthscenes-{spec.seed}-{index}".encode()).hexdigest()[:16]


def render_sample(spec: SynthSpec, index: int) -> dict[str, Any]:
    """One WebDataset sample: `__key__`, `jpg` bytes, `txt` caption, `json` ground truth."""
    objects, background, _ = scene(spec, index)
    caption = web_caption(spec, index, objects)
    meta: dict[str, Any] = {
        "uid": uid(spec, index),
        "key": f"{index:09d}",
        "width": spec.image_size,
        "height": spec.image_size,
        "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "bbox": list(o.box), "area": o.area} for o in objects
        ],
        "labels": {"shape": objects[0].shape, "colour": objects[0].colour, "count": len(objects)},
        "captions": perspective_captions(objects, spec.image_size),
        "noisy": False,
    }
    rng = _rng(spec, index, "noise")
    if spec.num_samples > 1 and rng.random() < spec.noisy_fraction:
        other = rng.randrange(spec.num_samples - 1)
        other += other >= index
        caption = web_caption(spec, other, scene(spec, other)[0])
        meta.update(noisy=True, caption_source_uid=uid(spec, other))
    return {
        "__key__": meta["key"],
        "jpg": draw(spec, objects, background),
        "txt": caption,
        "json": json.dumps(meta).encode(),
    }


def write_synthscenes(url_prefix: str, spec: SynthSpec) -> list[str]:
    """Write the dataset as `{url_prefix}/00000.tar ...` (local folder or s3://bucket/prefix)."""
    started = time.time()

    def samples():
        for i in range(spec.num_samples):
            if i and i % 5000 == 0:
                log.info("SynthScenes: %d/%d samples", i, spec.num_samples)
            yield render_sample(spec, i)

    urls = write_shards(url_prefix, samples(), spec.samples_per_shard)
    log.info(
        "SynthScenes: %d samples in %d shards at %s (%.1fs)",
        spec.num_samples,
        len(urls),
        url_prefix,
        time.time() - started,
    )
    return urls
