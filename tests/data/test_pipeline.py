"""The reader: split, resume equivalence, corrupt data, img2dataset layout, evaluation split."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from loader_setup import NORM, TOK, cfg
from PIL import Image

from cliplab.data.augment import random_resized_crop
from cliplab.data.pipeline import Reader, eval_batches, inspect_shards, make_train_loader
from cliplab.data.shards import expand_urls
from cliplab.errors import DataError
from tarfaults import cut_inside_member, with_garbage_jpg


def test_crop_box_reproduces_the_crop() -> None:
    img = Image.fromarray(torch.randint(0, 255, (40, 60, 3), dtype=torch.uint8).numpy())
    crop, box = random_resized_crop(img, 16, (0.3, 0.8), (0.75, 1.33), random.Random(0))
    x0, y0, x1, y1 = box[0] * 60, box[1] * 40, box[2] * 60, box[3] * 40
    again = img.resize((16, 16), Image.Resampling.BICUBIC, box=(x0, y0, x1, y1))
    assert list(again.getdata()) == list(crop.getdata())
    assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1


def test_ranks_and_workers_split_an_epoch_without_loss_or_duplicates(shards) -> None:
    urls = expand_urls(shards)
    c = cfg(shards, shuffle_buffer=0, num_workers=2)
    seen = []
    for g in range(4):  # 2 ranks x 2 loader workers
        stream = Reader(urls, c, g, 4, None).samples()
        while True:
            epoch, raw = next(stream)
            if epoch > 0:
                break
            seen.append(raw["__key__"])
    assert len(seen) == 240 and len(set(seen)) == 240


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_exactly(shards, workers) -> None:
    c = cfg(shards, num_workers=workers)
    loader, position = make_train_loader(c, TOK, *NORM, rank=1, world_size=2, position=None)
    it, ref, state = iter(loader), [], None
    for i in range(24):  # 120 samples per rank per epoch = 15 batches: crosses an epoch boundary
        batch = next(it)
        position.update(batch)
        ref.append(batch)
        if i == 6:
            state = json.loads(json.dumps(position.state_dict()))  # as it travels through a checkpoint
    resumed, _ = make_train_loader(c, TOK, *NORM, rank=1, world_size=2, position=state)
    it2 = iter(resumed)
    for i in range(7, 24):
        batch = next(it2)
        assert batch["key"] == ref[i]["key"], f"batch {i}"
        assert torch.equal(batch["image"], ref[i]["image"]) and torch.equal(batch["text"], ref[i]["text"])


def test_resume_refuses_a_different_reader_count(shards) -> None:
    loader, position = make_train_loader(cfg(shards), TOK, *NORM, rank=0, world_size=1, position=None)
    position.update(next(iter(loader)))
    other, _ = make_train_loader(cfg(shards, num_workers=2), TOK, *NORM, 0, 1, position.state_dict())
    with pytest.raises(Exception, match="resume with the same"):
        next(iter(other))


def test_corrupt_samples_and_shards_are_skipped_counted_and_named(shards, tmp_path, caplog) -> None:
    src = Path(expand_urls(shards)[0]).parent
    (tmp_path / "a.tar").write_bytes(with_garbage_jpg((src / "00000.tar").read_bytes(), nth=3))
    (tmp_path / "b.tar").write_bytes(cut_inside_member((src / "00001.tar").read_bytes()))
    c = cfg(f"{tmp_path}/{{a,b,missing}}.tar", shuffle_buffer=0)
    loader, position = make_train_loader(c, TOK, *NORM, rank=0, world_size=1, position=None)
    it = iter(loader)
    keys = []
    for _ in range(6):
        batch = next(it)
        position.update(batch)
        keys += batch["key"]
    skipped = position.state_dict()["skipped"]
    assert skipped["samples"] >= 1 and skipped["shards"] >= 2
    assert "b.tar" in caplog.text and "missing.tar" in caplog.text
    assert "b.tar: ReadError: unexpected end of data\n" in caplog.text
    assert "object at 0x" not in caplog.text and " @ <" not in caplog.text
    assert len(set(keys)) > 29  # the good samples of both shards keep coming


def test_an_empty_tar_is_a_skipped_shard_and_logged(shards, tmp_path, caplog) -> None:
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass  # a valid tar without members
    good = expand_urls(shards)[0]
    stream = Reader([good, str(tmp_path / "empty.tar")], cfg(shards, shuffle_buffer=0), 0, 1, None)
    samples = stream.samples()
    keys = [next(samples)[1]["__key__"] for _ in range(40)]  # past the end of epoch 0 (30 + 0 samples)
    assert len(set(keys)) == 30
    assert stream.skipped["shards"] >= 1
    assert "empty.tar after 0 samples: no samples (an empty tar)" in caplog.text
    report = inspect_shards(f"{tmp_path}/empty.tar,{good}")
    assert report["per_shard"][str(tmp_path / "empty.tar")] == 0
    assert f"{tmp_path}/empty.tar: no samples (an empty tar)" in report["shard_errors"]


def test_inspecting_shards_without_samples_is_an_error(tmp_path) -> None:
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(DataError, match=r"no samples in its 2 shard\(s\): .*nope\.tar: no such object"):
        inspect_shards(f"{tmp_path}/{{nope,empty}}.tar")


@pytest.mark.parametrize("resampled", [False, True])
def test_all_shards_unreadable_is_an_error(tmp_path, resampled) -> None:
    c = cfg(f"{tmp_path}/{{x,y}}.tar", resampled=resampled, samples_per_epoch=64 if resampled else None)
    loader, _ = make_train_loader(c, TOK, *NORM, 0, 1, None)
    with pytest.raises(DataError, match="none of the 2 shards is readable"):
        next(iter(loader))


def test_a_reader_whose_epoch_is_all_bad_keeps_going(shards, tmp_path) -> None:
    """Reader 1 of 2 gets only the missing shard in some epochs; the good shard of other epochs still comes."""
    good = expand_urls(shards)[0]
    urls = [good, f"{tmp_path}/missing.tar"]
    stream = Reader(urls, cfg(shards, shuffle_buffer=0), 1, 2, None).samples()
    keys = [next(stream)[1]["__key__"] for _ in range(100)]
    assert len(set(keys)) == 30


def test_foreign_img2dataset_shards_read_unchanged(tmp_path) -> None:
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"{shard:05d}.tar")) as w:
            for i in range(5):
                img = io.BytesIO()
                Image.new("RGB", (50, 40), (10 * i, 80, 200)).save(img, format="JPEG")
                key = f"{shard:05d}{i:04d}"
                w.write(
                    {
                        "__key__": key,
                        "jpg": img.getvalue(),
                        "txt": f"caption {key}",
                        "json": json.dumps({"url": "http://x", "width": 50, "status": "success", "key": key}),
                    }
                )
        (tmp_path / f"{shard:05d}_stats.json").write_text("{}")
        (tmp_path / f"{shard:05d}.parquet").write_bytes(b"PAR1")
    loader, _ = make_train_loader(
        cfg(f"{tmp_path}/{{00000..00001}}.tar", batch_size=4, shuffle_buffer=0), TOK, *NORM, 0, 1, None
    )
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["key"][0] == "000000000"
    assert batch["json"][0]["status"] == "success"
    report = inspect_shards(f"{tmp_path}/{{00000..00001}}.tar")
    assert report["samples"] == 10 and report["examples"][0]["caption"] == "caption 000000000"


def test_eval_reader_is_disjoint_capped_and_deterministic(shards) -> None:
    def keys(rank: int) -> list[str]:
        return [k for b in eval_batches(shards, 16, 32, *NORM, TOK, "txt", rank, 2, 100) for k in b["key"]]

    a, b = keys(0), keys(1)
    assert len(a) == len(b) == 50 and not set(a) & set(b)
    assert a == keys(0)


def test_resampled_epochs_have_a_fixed_size_and_resume(shards) -> None:
    c = cfg(shards, resampled=True, samples_per_epoch=100, shuffle_buffer=0)
    reader = Reader(expand_urls(shards), c, 1, 2, None)
    stream = reader.samples()
    epochs = [next(stream)[0] for _ in range(120)]
    assert epochs.count(0) == 50 and epochs.count(1) == 50 and epochs.count(2) == 20
    resumed = Reader(expand_urls(shards), c, 1, 2, json.loads(json.dumps(reader.cursor()))).samples()
    again = Reader(expand_urls(shards), c, 1, 2, None).samples()
    ref = [next(again)[1]["__key__"] for _ in range(150)][120:]
    assert [next(resumed)[1]["__key__"] for _ in range(30)] == ref


def test_misaligned_views_come_from_the_loader_with_their_geometry(shards) -> None:
    from cliplab.config import ViewsConfig

    c = cfg(shards, views=ViewsConfig(count=3, crop_scale=(0.1, 0.5), colour_jitter=0.3))
    batch = next(iter(make_train_loader(c, TOK, *NORM, 0, 1, None)[0]))
    assert batch["views"].shape == (8, 3, 3, 32, 32)
    assert batch["view_boxes"].shape == (8, 3, 4) and batch["view_flip"].shape == (8, 3)
    boxes = batch["view_boxes"]
    areas = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    assert ((areas > 0.05) & (areas < 0.55)).all()
    assert (batch["view_jitter"] >= 0).all() and (batch["view_jitter"] <= 1).all()
    assert not torch.equal(batch["views"][:, 0], batch["views"][:, 1])
