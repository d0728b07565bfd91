"""The embedded pool as scoring reads it: per-shard parquet outputs concatenated into local memmaps.

Rows are in pool order: shards in the order of the pool spec, samples by key inside a shard. That
order is what the seeded negCLIPLoss partitions index, so scores are reproducible from the config.
Embeddings go to `.npy` memmaps (float16) in a local work folder, so a pool larger than memory is
scored out of core; the per-sample metadata stays an in-memory Arrow table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cliplab.data.shards import filesystem
from cliplab.errors import DataError
from cliplab.select.embed import META, output_paths, read_marker


@dataclass
class Pool:
    """Image and text embeddings (N, d) float16 memmaps and the metadata table (uid, key, shard, caption, noisy)."""

    image: np.ndarray
    text: np.ndarray
    meta: pa.Table

    def __len__(self) -> int:
        return len(self.meta)


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    flat = column.combine_chunks()
    return flat.values.to_numpy(zero_copy_only=False).reshape(len(flat), -1)


def load_pool(out: str, urls: list[str], workdir: Path, name: str) -> Pool:
    """Concatenate the complete shard outputs of `urls` under `out` (shards without output are left out)."""
    fs = filesystem(out)[0]
    done = [(u, m["rows"]) for u in urls if (m := read_marker(out, u)) is not None and m["rows"]]
    if not done:
        raise DataError(f"{out}: no embedded shard to score (every shard of the {name} was unreadable)")
    n = sum(rows for _, rows in done)
    workdir.mkdir(parents=True, exist_ok=True)
    image = text = None
    metas, at = [], 0
    for url, rows in done:
        with fs.open(output_paths(out, url)[0], "rb") as f:
            table = pq.read_table(f)
        if len(table) != rows:
            raise DataError(f"{url}: embedding output has {len(table)} rows, its marker says {rows}")
        v, t = _matrix(table.column("image_emb")), _matrix(table.column("text_emb"))
        if image is None:
            shape = (n, v.shape[1])
            image = np.lib.format.open_memmap(workdir / f"{name}_image.npy", "w+", np.float16, shape)
            text = np.lib.format.open_memmap(workdir / f"{name}_text.npy", "w+", np.float16, shape)
        image[at : at + rows], text[at : at + rows] = v, t
        metas.append(table.select(list(META)))
        at += rows
    image.flush()
    text.flush()
    return Pool(image, text, pa.concat_tables(metas))
