"""Reshard a selected subset into new WebDataset shards, members copied byte for byte, in parallel Ray tasks.

Like DataComp's resharder: every pool sample whose uid is in the subset is written once per time
the uid is listed (a uid listed m times is upweighted m-fold), in pool order (pool shards in spec
order, keys in order inside a shard), `samples_per_shard` per output shard (the last one may be
shorter). Each output shard is written by one Ray task that reads only the source shards its samples
come from. Members (`jpg`, `txt`, `json`, anything else) are copied as bytes, never re-encoded; only
the `__key__` is new (`{shard:05d}_{index:06d}`), since copies of a sample and samples from
different pools could share a key. Beside each shard, `NNNNN_stats.json` in img2dataset's layout
(what training's readers and DataComp tools expect), and `manifest.parquet` maps every new key to
its uid, source shard and source key. The folder's earlier shards are replaced: the plan is deterministic.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import webdataset as wds

from cliplab.data.pipeline import read_shard
from cliplab.data.shards import filesystem, shard_stats
from cliplab.errors import DataError
from cliplab.select import uids as U

Segment = tuple[str, list[tuple[str, str]]]  # source shard URL, (key, uid) to copy in order, repeated per copy


@dataclass(frozen=True)
class ReshardResult:
    """The new shards, how many samples they hold, and subset uids not found in the pool."""

    urls: list[str]
    samples: int
    missing_uids: int
    spec: str  # brace spec of the new shards, for data.train_shards


def plan(meta: pa.Table, subset: np.ndarray, samples_per_shard: int) -> tuple[list[list[Segment]], int]:
    """Output shards as lists of (source shard, keys) segments, and the number of subset uids not in the pool."""
    wanted = Counter(U.to_hex(subset))
    uid, key, shard = (meta.column(c).to_pylist() for c in ("uid", "key", "shard"))
    flat = [(s, k, u) for u, k, s in zip(uid, key, shard, strict=True) for _ in range(wanted.get(u, 0))]
    shards: list[list[Segment]] = []
    for start in range(0, len(flat), samples_per_shard):
        segments: list[Segment] = []
        for s, k, u in flat[start : start + samples_per_shard]:
            if not segments or segments[-1][0] != s:
                segments.append((s, []))
            segments[-1][1].append((k, u))
        shards.append(segments)
    return shards, len(set(wanted) - set(uid))


def write_one(index: int, segments: list[Segment], prefix: str) -> dict[str, Any]:
    """Write output shard `index` from its segments (Ray task); raises if a source shard lost a sample."""
    started = time.time()
    buf = io.BytesIO()
    writer = wds.TarWriter(buf, encoder=False)
    manifest: list[tuple[str, str, str, str]] = []
    for url, keys in segments:
        want, errors = {k for k, _ in keys}, []
        found = {
            raw["__key__"]: {k: v for k, v in raw.items() if not k.startswith("__")}
            for raw in read_shard(url, errors)
            if raw["__key__"] in want
        }
        if errors or want - set(found):
            raise DataError(
                f"reshard: {url}: {'; '.join(errors) or 'samples missing: ' + str(sorted(want - set(found))[:5])}"
            )
        for k, u in keys:
            new = f"{index:05d}_{len(manifest):06d}"
            writer.write({"__key__": new, **found[k]})
            manifest.append((new, u, url, k))
    writer.close()
    fs, root = filesystem(prefix)
    name = f"{root.rstrip('/')}/{index:05d}"
    fs.pipe_file(f"{name}.tar", buf.getvalue())
    fs.pipe_file(f"{name}_stats.json", shard_stats(len(manifest), started))
    return {"samples": len(manifest), "manifest": manifest}


def reshard(
    meta: pa.Table, subset: np.ndarray, prefix: str, samples_per_shard: int, cpus: float = 1.0
) -> ReshardResult:
    """Write the subset's samples as `{prefix}/00000.tar ...` with one Ray task per output shard."""
    shards, missing = plan(meta, subset, samples_per_shard)
    if not shards:
        raise DataError("reshard: no pool sample is in the subset")
    fs, root = filesystem(prefix)
    if fs.exists(root):  # our own folder: shards of an earlier, larger plan must not linger
        stale = [p for p in fs.find(root) if p.endswith((".tar", "_stats.json", "manifest.parquet"))]
        if stale:
            fs.rm(stale)
    if not prefix.startswith("s3://"):
        fs.makedirs(root, exist_ok=True)
    task = ray.remote(num_cpus=cpus)(write_one)
    done = ray.get([task.remote(i, segments, prefix) for i, segments in enumerate(shards)])
    rows = [row for d in done for row in d["manifest"]]
    table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(("key", "uid", "source_shard", "source_key"))})
    out = io.BytesIO()
    pq.write_table(table, out)
    fs.pipe_file(f"{root.rstrip('/')}/manifest.parquet", out.getvalue())
    base = prefix.rstrip("/")
    urls = [f"{base}/{i:05d}.tar" for i in range(len(shards))]
    spec = urls[0] if len(urls) == 1 else f"{base}/{{00000..{len(urls) - 1:05d}}}.tar"
    return ReshardResult(urls, sum(int(d["samples"]) for d in done), missing, spec)
