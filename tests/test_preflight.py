"""The driver's checks before Ray starts: shard specs listed on the real S3 endpoint and local folders."""

from __future__ import annotations

import fsspec
import pytest

from cliplab.config import validate_tree
from cliplab.errors import ConfigError, DataError
from cliplab.preflight import check_before_ray, existing_urls


def experiment(train: str, val: str | None = None, workers: int = 2, loaders: int = 1, resampled: bool = False):
    data = {"train_shards": train, "val_shards": val, "num_workers": loaders, "resampled": resampled}
    return validate_tree(
        {
            "name": "pre",
            "data": {**data, "samples_per_epoch": 100 if resampled else None},
            "model": {"name": "ViT-B-32"},
            "train": {"steps": 1},
            "scaling": {"num_workers": workers},
        }
    )


@pytest.fixture
def s3_shards(s3_bucket) -> str:
    fs = fsspec.filesystem("s3")
    for i in range(3):
        fs.pipe_file(f"{s3_bucket}/train/{i:05d}.tar", b"x")
    fs.pipe_file(f"{s3_bucket}/val/00000.tar", b"x")
    return f"s3://{s3_bucket}"


def test_existing_shards_are_found_by_listing(s3_shards, tmp_path) -> None:
    (tmp_path / "a.tar").write_bytes(b"x")
    urls = [f"{s3_shards}/train/{i:05d}.tar" for i in range(5)] + [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert existing_urls(urls) == set(urls[:3] + urls[5:6])
    assert existing_urls([f"{s3_shards}/elsewhere/00000.tar", "s3://no-such-bucket-here/00000.tar"]) == set()


def test_a_spec_that_matches_nothing_is_refused_naming_the_field(s3_shards) -> None:
    with pytest.raises(DataError, match=r"data\.train_shards: none of the 4 shards of .*/nothing/\{0..3\}\.tar"):
        check_before_ray(experiment(f"{s3_shards}/nothing/{{0..3}}.tar"))
    with pytest.raises(DataError, match=r"data\.val_shards: none of the 1 shards"):
        check_before_ray(experiment(f"{s3_shards}/train/{{00000..00002}}.tar", f"{s3_shards}/val/00009.tar"))


def test_fewer_shards_than_readers_is_refused_unless_resampled(s3_shards, caplog) -> None:
    spec = f"{s3_shards}/train/{{00000..00004}}.tar"  # 5 named, 3 exist
    check_before_ray(experiment(spec, f"{s3_shards}/val/00000.tar", workers=3))
    assert "data.train_shards: 2 of 5 shards do not exist" in caplog.text
    with pytest.raises(ConfigError, match=r"data\.train_shards: 3 shards \(of 5 named\) for 2 Ray workers x 2 loader"):
        check_before_ray(experiment(spec, workers=2, loaders=2))
    check_before_ray(experiment(spec, workers=2, loaders=2, resampled=True))
