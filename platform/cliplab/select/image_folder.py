"""A NormSim target given as a folder of image files (local or s3://), read by the embedding pass in chunks.

The folder is listed once, recursively and sorted; every `files_per_task` files form one chunk, which
is one read task and one embedding output, exactly like a shard. A chunk's name is the folder plus
its position and a hash of its file names, so a rerun re-embeds only chunks whose file lists changed
(files added at the end of the sort order touch the last chunk only; an insertion shifts the rest).
A file's key is its path under the folder without the extension; captions are empty (the target
needs only image embeddings). A file that cannot be decoded is skipped and counted, as a
corrupt image in a shard is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import suppress
from typing import Any

from cliplab.data.pipeline import IMAGE_KEYS
from cliplab.data.shards import filesystem
from cliplab.errors import DataError


def list_images(folder: str) -> list[str]:
    """Every image file under `folder` (extensions jpg, jpeg, png, webp, any case) as full URLs, sorted."""
    fs, root = filesystem(folder)
    if not fs.isdir(root):
        raise DataError(f"target.images: {folder}: no such folder")
    scheme = "s3://" if folder.startswith("s3://") else ""
    files = sorted(f"{scheme}{p}" for p in fs.find(root) if p.rsplit(".", 1)[-1].lower() in IMAGE_KEYS)
    if not files:
        raise DataError(f"target.images: {folder}: no .jpg, .jpeg, .png or .webp file in it")
    return files


def image_chunks(folder: str, files_per_task: int) -> dict[str, list[str]]:
    """Chunk name -> its files, in folder order (the names are what the embedding outputs are keyed by)."""
    files = list_images(folder)
    out = {}
    for start in range(0, len(files), files_per_task):
        chunk = files[start : start + files_per_task]
        digest = hashlib.sha1("\n".join(chunk).encode()).hexdigest()[:8]
        out[f"{folder.rstrip('/')}#{start // files_per_task:05d}-{digest}"] = chunk
    return out


def read_files(chunk: str, files: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__` + image bytes under its extension) of one chunk, as read_shard gives a shard's."""
    root = chunk.rsplit("#", 1)[0] + "/"
    fs = filesystem(root)[0]
    for url in files:
        stem, ext = url.rsplit(".", 1)
        raw: dict[str, Any] = {"__key__": stem.removeprefix(root)}
        with suppress(FileNotFoundError):  # listed, then removed: skipped and counted like an undecodable image
            raw[ext.lower()] = fs.cat_file(filesystem(url)[1])
        yield raw
