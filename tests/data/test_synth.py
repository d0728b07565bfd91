"""SynthScenes: deterministic, truthful ground truth, img2dataset layout, local and S3."""

from __future__ import annotations

import io
import json

import fsspec
import pytest
from PIL import Image

from cliplab.data.shards import expand_urls, list_shards, open_shard
from cliplab.data.synth import COLOURS, SHAPES, SynthSpec, render_sample, write_synthscenes
from cliplab.errors import DataError


def test_same_seed_same_bytes_other_seed_differs() -> None:
    spec = SynthSpec(num_samples=10)
    a, b = render_sample(spec, 3), render_sample(spec, 3)
    assert a == b
    c = render_sample(SynthSpec(num_samples=10, seed=1), 3)
    assert c["jpg"] != a["jpg"]


def test_json_ground_truth_matches_the_image() -> None:
    spec = SynthSpec(num_samples=200, image_size=64)
    for i in range(50):
        s = render_sample(spec, i)
        meta = json.loads(s["json"])
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.size == (64, 64) and s["__key__"] == f"{i:09d}" == meta["key"]
        objs = meta["objects"]
        assert 1 <= len(objs) <= 4 and meta["labels"]["count"] == len(objs)
        largest = max(objs, key=lambda o: o["area"])
        assert (meta["labels"]["shape"], meta["labels"]["colour"]) == (largest["shape"], largest["colour"])
        assert sum(o["size"] == "large" for o in objs) == 1
        for o in objs:
            assert o["shape"] in SHAPES and o["colour"] in COLOURS
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert set(meta["captions"]) == {"colour", "shape", "layout", "count", "long"}
        # the largest object's colour dominates its box centre
        cx, cy = (largest["bbox"][0] + largest["bbox"][2]) // 2, (largest["bbox"][1] + largest["bbox"][3]) // 2
        if largest["shape"] not in ("cross", "star"):
            pixel = img.convert("RGB").getpixel((cx, cy))
            assert sum(abs(p - q) for p, q in zip(pixel, COLOURS[largest["colour"]], strict=True)) < 90
        if not meta["noisy"]:
            assert largest["colour"] in s["txt"] and largest["shape"] in s["txt"]


def test_noisy_fraction_borrows_another_images_caption() -> None:
    spec = SynthSpec(num_samples=400, noisy_fraction=0.25)
    samples = [render_sample(spec, i) for i in range(400)]
    metas = [json.loads(s["json"]) for s in samples]
    noisy = [i for i, m in enumerate(metas) if m["noisy"]]
    assert 60 <= len(noisy) <= 140
    by_uid = {m["uid"]: i for i, m in enumerate(metas)}
    for i in noisy[:20]:
        source = by_uid[metas[i]["caption_source_uid"]]
        assert source != i
        assert samples[i]["txt"] in {render_sample(SynthSpec(num_samples=400), source)["txt"], samples[source]["txt"]}


def test_shards_locally_with_stats(tmp_path) -> None:
    urls = write_synthscenes(str(tmp_path / "ds"), SynthSpec(num_samples=25, samples_per_shard=10))
    assert [u.rsplit("/", 1)[1] for u in urls] == ["00000.tar", "00001.tar", "00002.tar"]
    stats = json.loads((tmp_path / "ds" / "00002_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 5
    assert list_shards(str(tmp_path / "ds")) == urls


def test_shards_on_s3_and_missing_ones_are_named(s3_bucket) -> None:
    urls = write_synthscenes(f"s3://{s3_bucket}/synth", SynthSpec(num_samples=12, samples_per_shard=6))
    assert list_shards(f"s3://{s3_bucket}/synth") == urls
    assert expand_urls(f"s3://{s3_bucket}/synth/{{00000..00001}}.tar") == urls
    assert fsspec.filesystem("s3").exists(f"{s3_bucket}/synth/00001_stats.json")
    with open_shard(urls[0]) as f:
        assert len(f.read()) > 6 * 1000
    with pytest.raises(DataError, match=f"s3://{s3_bucket}/synth/00009.tar"):
        open_shard(f"s3://{s3_bucket}/synth/00009.tar")
    with pytest.raises(DataError, match="bucket 'no-such-bucket' does not exist"):
        write_synthscenes("s3://no-such-bucket/x", SynthSpec(num_samples=1))
