"""Shard URLs and I/O over fsspec: brace expansion, local/file:///s3:// opening with retries, writing.

S3 endpoints and credentials come from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...),
which s3fs and botocore read themselves; nothing here takes a secret as an argument. Retries and timeouts
are `cliplab.storage`'s.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterable
from typing import IO, Any

import fsspec
import webdataset as wds
from braceexpand import braceexpand

from cliplab import storage
from cliplab.errors import DataError


def expand_urls(spec: str | list[str]) -> list[str]:
    """Brace-expand one spec (or several, comma/space separated) into shard URLs, in order."""
    items = spec if isinstance(spec, list) else [s for s in re.split(r"[,\s]+(?![^{]*\})", spec.strip()) if s]
    urls = [u for item in items for u in braceexpand(item)]
    if not urls:
        raise DataError(f"shard spec {spec!r} names no shard")
    return urls


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a URL, with the storage retry policy for s3:// (`cliplab.storage`)."""
    return storage.filesystem(url)


def open_shard(url: str) -> IO[bytes]:
    """Open a shard for streaming; reads ride out storage outages (within `storage.outage_budget_s`).

    A missing shard raises DataError naming it; an unreachable endpoint or refused credentials raise
    StorageError (never a skipped shard).
    """
    try:
        return storage.ResumableRead(url)  # type: ignore[return-value]
    except FileNotFoundError:
        raise DataError(f"shard {url}: no such object") from None


def shard_stats(count: int, started: float) -> bytes:
    """img2dataset's `_stats.json` for a shard of `count` samples written since `started` (all successes)."""
    stats = {
        "count": count,
        "successes": count,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "start_time": started,
        "end_time": time.time(),
        "status_dict": {"success": count},
    }
    return json.dumps(stats).encode()


def write_shards(prefix: str, samples: Iterable[dict[str, Any]], samples_per_shard: int) -> list[str]:
    """Write samples as `{prefix}/00000.tar, ...` with img2dataset's `_stats.json` beside each shard."""
    fs, root = filesystem(prefix)
    if prefix.startswith("s3://"):
        bucket = root.split("/", 1)[0]
        if not fs.exists(bucket):
            raise DataError(f"{prefix}: bucket {bucket!r} does not exist; create it first")
    else:
        fs.makedirs(root, exist_ok=True)
    urls: list[str] = []
    buffer, count, started = io.BytesIO(), 0, time.time()
    writer = wds.TarWriter(buffer)

    def flush() -> None:
        nonlocal buffer, writer, count, started
        writer.close()
        name = f"{len(urls):05d}"
        url = f"{prefix.rstrip('/')}/{name}.tar"
        fs.pipe_file(f"{root.rstrip('/')}/{name}.tar", buffer.getvalue())
        fs.pipe_file(f"{root.rstrip('/')}/{name}_stats.json", shard_stats(count, started))
        urls.append(url)
        buffer, count, started = io.BytesIO(), 0, time.time()
        writer = wds.TarWriter(buffer)

    for sample in samples:
        writer.write(sample)
        count += 1
        if count == samples_per_shard:
            flush()
    if count:
        flush()
    writer.close()
    return urls


def list_shards(prefix: str) -> list[str]:
    """The `*.tar` shards under a local folder or s3 prefix, sorted."""
    fs, root = filesystem(prefix)
    scheme = prefix.split("://", 1)[0] + "://" if "://" in prefix else ""
    found = sorted(p for p in fs.find(root) if p.endswith(".tar"))
    if not found:
        raise DataError(f"{prefix}: no .tar shards found")
    return [f"{scheme}{p}" if scheme and not p.startswith(scheme) else p for p in found]
