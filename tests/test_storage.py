"""The storage retry policy against the real S3 endpoint behind a loopback proxy that goes down."""

from __future__ import annotations

import time
from pathlib import Path

import fsspec
import pyarrow.fs
import pytest

from cliplab import storage
from cliplab.data.shards import open_shard
from cliplab.errors import DataError, StorageAuthError, StorageUnavailable
from tcpproxy import TcpProxy


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """A proxy in front of the S3 endpoint; clients in this test talk to it (from a fresh s3fs instance)."""
    with TcpProxy((s3_server.host, s3_server.port)) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", p.endpoint)
        yield p
    storage.configure(storage.RetryPolicy().outage_budget_s)


@pytest.fixture
def shard(s3_server, s3_bucket) -> tuple[str, bytes]:
    data = bytes(range(256)) * 4096  # 1 MiB
    url = f"s3://{s3_bucket}/shards/00000.tar"
    fsspec.filesystem("s3", endpoint_url=s3_server.endpoint).pipe_file(url, data)
    return url, data


def test_shard_read_rides_out_a_short_outage(proxy, shard):
    url, data = shard
    storage.configure(30)
    proxy.outage(3)
    started = time.monotonic()
    with open_shard(url) as stream:
        assert stream.read() == data
    assert time.monotonic() - started >= 2.5, "the read waited for the endpoint to come back"


def test_read_resumes_at_its_offset_after_a_dropped_connection(proxy, shard, monkeypatch):
    url, data = shard
    storage.configure(30)
    stream = storage.ResumableRead(url)
    head = stream.read(1000)
    proxy.outage(2)
    stream._drop()  # the open file's connection is gone with the outage
    assert head + stream.read() == data


def test_permanent_outage_fails_within_the_budget_naming_endpoint_and_url(proxy, shard):
    url, _ = shard
    storage.configure(4)
    proxy.down()
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as err:
        open_shard(url)
    took = time.monotonic() - started
    assert proxy.endpoint in str(err.value) and url in str(err.value), err.value
    assert "storage.outage_budget_s" in str(err.value)
    assert 4 <= took < 4 + 15, took


def test_missing_credentials_fail_at_once(proxy, shard, monkeypatch, tmp_path):
    url, _ = shard
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage.PolicyS3.clear_instance_cache()
    started = time.monotonic()
    with pytest.raises(StorageAuthError, match="credentials missing or refused") as err:
        open_shard(url)
    assert time.monotonic() - started < 5, "not retried as if transient"
    assert url in str(err.value)
    storage.PolicyS3.clear_instance_cache()


def test_missing_shard_is_a_data_error_not_an_outage(proxy, s3_bucket):
    with pytest.raises(DataError, match="no such object"):
        open_shard(f"s3://{s3_bucket}/nothing.tar")


def test_ray_storage_upload_and_download_ride_out_an_outage(proxy, s3_bucket, tmp_path: Path):
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "model.pt").write_bytes(b"m" * 300_000)
    (local / "data_rank0.json").write_text("{}")
    path, fs = storage.ray_storage(f"s3://{s3_bucket}/runs/r1", storage.RetryPolicy(outage_budget_s=30))
    proxy.outage(3)
    pyarrow.fs.copy_files(str(local), f"{path}/checkpoint_1", destination_filesystem=fs)
    proxy.outage(3)
    back = tmp_path / "back"
    back.mkdir()
    pyarrow.fs.copy_files(f"{path}/checkpoint_1", str(back), source_filesystem=fs)
    assert (back / "model.pt").read_bytes() == b"m" * 300_000
    assert (back / "data_rank0.json").read_text() == "{}"
