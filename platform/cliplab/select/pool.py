"""The embedded pool as scoring reads it: the complete shard outputs in pool order, their row offsets, metadata.

Rows are in pool order: shards in the order of the pool spec, samples by key inside a shard. That
order is what the seeded negCLIPLoss partitions index, so scores are reproducible from the config.
Only shards whose completion marker exists count; a shard's global row offset is the sum of the
markers' row counts before it, so any worker can number its rows without seeing the others. The
embeddings stay in the per-shard parquet files (read by the scoring tasks, score_tasks.py); the
driver reads only the per-sample metadata columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cliplab.data.shards import filesystem
from cliplab.errors import DataError
from cliplab.select.embed import output_paths, read_marker

META = ("uid", "key", "shard", "noisy")  # what the recipe, scores.parquet and resharding need per sample


@dataclass(frozen=True)
class ShardPart:
    """One complete shard output: its parquet path, its first global row index and its row count."""

    url: str
    path: str
    offset: int
    rows: int


@dataclass(frozen=True)
class PoolIndex:
    """The complete shards of a pool under `out` (a local folder or s3:// prefix), in pool order."""

    out: str
    parts: tuple[ShardPart, ...]

    def __len__(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def sizes(self) -> list[int]:
        """Rows per part, in pool order (what the negCLIPLoss windows are cut from)."""
        return [p.rows for p in self.parts]


def index_pool(out: str, urls: list[str], name: str) -> PoolIndex:
    """The complete shard outputs of `urls` under `out`, offsets from their markers (shards without output left out)."""
    parts, at = [], 0
    for url in urls:
        marker = read_marker(out, url)
        if marker is None or not marker["rows"]:
            continue
        parts.append(ShardPart(url, output_paths(out, url)[0], at, marker["rows"]))
        at += marker["rows"]
    if not parts:
        raise DataError(f"{out}: no embedded shard to score (every shard of the {name} was unreadable)")
    return PoolIndex(out, tuple(parts))


def read_part(out: str, part: ShardPart, columns: list[str]) -> pa.Table:
    """The `columns` of one shard output, checked against its marker's row count."""
    with filesystem(out)[0].open(part.path, "rb") as f:
        table = pq.read_table(f, columns=columns)
    if len(table) != part.rows:
        raise DataError(f"{part.url}: embedding output has {len(table)} rows, its marker says {part.rows}")
    return table


def embedding_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list embedding column as an (n, d) float16 array."""
    flat = column.combine_chunks()
    return flat.values.to_numpy(zero_copy_only=False).reshape(len(flat), -1).astype(np.float16, copy=False)


def read_embeddings(out: str, part: ShardPart) -> tuple[np.ndarray, np.ndarray]:
    """One shard output's (image, text) embeddings as (n, d) float16 arrays."""
    table = read_part(out, part, ["image_emb", "text_emb"])
    return embedding_matrix(table.column("image_emb")), embedding_matrix(table.column("text_emb"))


def read_meta(index: PoolIndex) -> pa.Table:
    """The per-sample metadata (uid, key, shard, noisy) of the whole pool in pool order, without embeddings."""
    return pa.concat_tables([read_part(index.out, p, list(META)) for p in index.parts])
