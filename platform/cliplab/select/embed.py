"""The embedding pass on Ray Data: every shard of a pool through the frozen teacher, one parquet file per shard.

Pipeline: `from_items(urls, override_num_blocks=len(urls))` gives one read task per shard; the read
task streams the shard through cliplab's own reader (`data.pipeline.read_shard`: webdataset's tar
parsing, fsspec/S3 with retries), decodes and resizes each image on CPU (`eval_view`, the teacher's
eval transform) and yields chunks of rows; the teacher runs in a fixed-size actor pool
(`ActorPoolStrategy(size=embed.actors)`, `embed.gpus_per_actor` GPUs per actor; unset, one when the
Ray cluster has GPUs, CPU otherwise) and embeds images and captions. Ray's own `read_webdataset`
is avoided: it decodes every image at full size into a pandas frame per sample. A target given as
an image folder comes as chunks of files (image_folder.py), each read like a shard and written as
one output keyed by the chunk's name. With GPU actors the two stages run in
separate processes; with a CPU teacher whose actors ask for as many CPUs as a read task, Ray Data
fuses them (each actor then reads and decodes the shards it embeds), which is its own optimisation.

The driver collects the embedded rows per source shard and writes a shard's output once all of its
rows are there (the read task puts the shard's row count on its last chunk):
`<out>/<shard id>.parquet` with uid, key, source shard, caption, `noisy` (the json flag, -1 when
absent), image and text embeddings (float16, L2-normalised). The parquet file is written under a
temporary name and renamed, then a marker `<shard id>.done.json` (rows, skipped samples) is written;
only the marker makes a shard complete. A later pass over the same output skips complete shards, so
an interrupted pass resumes without recomputing finished shards, and a half-written file (no marker)
is recomputed, never taken as complete.

Skips: an undecodable sample (missing/corrupt image or caption) is skipped and counted in its shard's
marker. A shard that cannot be read to the end (cannot be opened, or a broken tar) gives no output
and no marker: it is counted as unreadable in this pass and retried by the next one; the samples
read before the failure are dropped, so the pool's content does not depend on where a transient
failure struck. A shard with no decodable sample at all is counted the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from cliplab.data.augment import eval_view
from cliplab.data.pipeline import decode, read_shard
from cliplab.data.shards import filesystem
from cliplab.select.config import ActorPoolConfig, EmbedConfig
from cliplab.select.image_folder import read_files
from cliplab.select.teacher import TeacherInfo, TeacherSource, load
from cliplab.select.uids import sample_uid

log = logging.getLogger("cliplab.select")
READ_CHUNK = 64  # rows per block out of a read task
META = ("uid", "key", "shard", "caption", "noisy")


def actor_gpus(pool: ActorPoolConfig) -> float:
    """GPUs per actor of `pool` (the teacher's, or a scoring pool's) on the Ray cluster this job runs on."""
    return pool.gpus(ray.cluster_resources().get("GPU", 0) >= 1)


def shard_id(url: str) -> str:
    """A stable file stem per source shard: a hash of its URL (unique) and its name (readable)."""
    name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar")
    return f"{hashlib.sha1(url.encode()).hexdigest()[:10]}-{name}"


@dataclass
class EmbedStats:
    """What one pass did: shards found complete, written now, unreadable; samples embedded and skipped."""

    shards: int = 0
    resumed: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    samples: int = 0
    skipped_samples: int = 0
    embedded: int = 0  # samples embedded by this pass (not resumed): what its samples/s counts

    def metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/shards": self.shards,
            f"{prefix}/shards_resumed": len(self.resumed),
            f"{prefix}/shards_unreadable": len(self.unreadable),
            f"{prefix}/samples": self.samples,
            f"{prefix}/skipped_samples": self.skipped_samples,
        }


def read_and_decode(
    batch: dict[str, np.ndarray], caption_key: str, image_size: int, mean: tuple, std: tuple, captions_optional: bool
) -> Iterator[dict[str, Any]]:
    """Ray Data read UDF: rows of each shard in `batch["url"]`; the last chunk carries the shard's totals.

    An item with `files` is a chunk of an image folder (image_folder.py), read file by file.
    """
    torch.set_num_threads(1)
    for url, files in zip(batch["url"].tolist(), batch["files"], strict=True):
        errors: list[str] = []
        rows: list[dict[str, Any]] = []
        good = skipped = 0
        for raw in read_files(url, list(files)) if len(files) else read_shard(url, errors):
            if captions_optional:
                raw.setdefault(caption_key, b"")
            decoded = decode(raw, caption_key)
            if decoded is None:
                skipped += 1
                continue
            img, caption, meta = decoded
            noisy = meta.get("noisy")
            rows.append(
                {
                    "uid": sample_uid(meta, url, raw["__key__"]),
                    "key": raw["__key__"],
                    "caption": caption,
                    "noisy": -1 if not isinstance(noisy, bool) else int(noisy),
                    "image": eval_view(img, image_size, mean, std).numpy().astype(np.float16),
                }
            )
            good += 1
            if len(rows) > READ_CHUNK:  # keep one chunk back: the last one must carry the totals
                yield _chunk(rows[:READ_CHUNK], url, -1, -1)
                rows = rows[READ_CHUNK:]
        if errors or not good:
            log.warning("shard %s: unreadable (%s); no output, retried next pass", url, "; ".join(errors) or "empty")
            continue
        yield _chunk(rows, url, good, skipped)


def _chunk(rows: list[dict[str, Any]], url: str, total: int, skipped: int) -> dict[str, Any]:
    n = len(rows)
    return {
        "uid": np.array([r["uid"] for r in rows], dtype=object),
        "key": np.array([r["key"] for r in rows], dtype=object),
        "caption": np.array([r["caption"] for r in rows], dtype=object),
        "noisy": np.array([r["noisy"] for r in rows], dtype=np.int8),
        "shard": np.array([url] * n, dtype=object),
        "shard_rows": np.full(n, total, dtype=np.int64),
        "shard_skipped": np.full(n, skipped, dtype=np.int64),
        "image": np.stack([r["image"] for r in rows]),
    }


class TeacherActor:
    """Ray Data actor: the teacher on this actor's GPU (or CPU), embedding images and captions."""

    def __init__(self, source: TeacherSource, cpus: float):
        torch.set_num_threads(max(1, int(cpus)))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, _, self.tokenizer = load(source)
        self.model = model.to(self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(np.asarray(batch["image"])).to(self.device, torch.float32)
        tokens = self.tokenizer([str(c) for c in batch["caption"]]).to(self.device)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["image_emb"] = self.model.encode_image(images, normalize=True).half().cpu().numpy()
        out["text_emb"] = self.model.encode_text(tokens, normalize=True).half().cpu().numpy()
        return out


def output_paths(out: str, url: str) -> tuple[str, str]:
    """(parquet path, marker path) of a shard's output, as filesystem paths under `out`."""
    root = filesystem(out)[1].rstrip("/")
    stem = f"{root}/{shard_id(url)}"
    return f"{stem}.parquet", f"{stem}.done.json"


def read_marker(out: str, url: str) -> dict[str, Any] | None:
    """The completion marker of a shard's output, or None when the shard is not complete."""
    fs = filesystem(out)[0]
    marker = output_paths(out, url)[1]
    return json.loads(fs.cat_file(marker)) if fs.exists(marker) else None


def _embedding_column(x: np.ndarray) -> pa.Array:
    x = np.ascontiguousarray(x, dtype=np.float16)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def write_output(out: str, url: str, parts: list[dict[str, np.ndarray]], skipped: int) -> int:
    """Write one shard's rows (sorted by key) as parquet under a temporary name, rename, then the marker."""
    cols = {k: np.concatenate([p[k] for p in parts]) for k in (*META, "image_emb", "text_emb")}
    order = np.argsort(cols["key"].astype(str), kind="stable")
    table = pa.table(
        {
            **{k: pa.array(cols[k][order].tolist()) for k in META if k != "noisy"},
            "noisy": pa.array(cols["noisy"][order], pa.int8()),
            "image_emb": _embedding_column(cols["image_emb"][order]),
            "text_emb": _embedding_column(cols["text_emb"][order]),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs = filesystem(out)[0]
    final, marker = output_paths(out, url)
    fs.pipe_file(final + ".tmp", buf.getvalue())
    fs.mv(final + ".tmp", final)
    fs.pipe_file(marker, json.dumps({"shard": url, "rows": len(table), "skipped_samples": skipped}).encode())
    return len(table)


def embed_shards(
    urls: list[str],
    out: str,
    teacher: TeacherInfo,
    cfg: EmbedConfig,
    caption_key: str = "txt",
    captions_optional: bool = False,
    label: str = "pool",
    files: dict[str, list[str]] | None = None,
) -> EmbedStats:
    """Embed every shard of `urls` not already complete under `out`; returns what the pass did.

    `files` maps the names of image-folder chunks among `urls` to their files (image_folder.py).
    """
    fs, root = filesystem(out)
    if not out.startswith("s3://"):
        fs.makedirs(root, exist_ok=True)
    stats = EmbedStats(shards=len(urls))
    todo = []
    for url in urls:
        marker = read_marker(out, url)
        if marker is None:
            todo.append(url)
            continue
        stats.resumed.append(url)
        stats.samples += marker["rows"]
        stats.skipped_samples += marker["skipped_samples"]
    log.info(
        "embed %s: %d shards, %d complete from an earlier pass, %d to embed",
        label,
        len(urls),
        len(stats.resumed),
        len(todo),
    )
    if todo:
        items = [{"url": u, "files": (files or {}).get(u, [])} for u in todo]
        _run(items, out, teacher, cfg, caption_key, captions_optional, stats, label)
    written = set(stats.written)
    stats.unreadable = [u for u in todo if u not in written]
    log.info(
        "embed %s: done, %d samples (%d skipped), %d shards written now, %d unreadable",
        label,
        stats.samples,
        stats.skipped_samples,
        len(stats.written),
        len(stats.unreadable),
    )
    return stats


def _run(
    items: list[dict[str, Any]],
    out: str,
    teacher: TeacherInfo,
    cfg: EmbedConfig,
    caption_key: str,
    captions_optional: bool,
    stats: EmbedStats,
    label: str,
) -> None:
    pre = teacher.preprocess
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        read_and_decode,
        batch_size=1,
        num_cpus=cfg.cpus_per_read,
        fn_kwargs={
            "caption_key": caption_key,
            "image_size": pre.image_size,
            "mean": pre.mean,
            "std": pre.std,
            "captions_optional": captions_optional,
        },
    )
    memory = {"memory": cfg.memory_per_actor_gb * 2**30} if cfg.memory_per_actor_gb else {}
    ds = ds.map_batches(
        TeacherActor,
        fn_constructor_kwargs={"source": teacher.source, "cpus": cfg.cpus_per_actor},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=actor_gpus(cfg) or None,
        **memory,
    )
    pending: dict[str, list[dict[str, np.ndarray]]] = {}
    have: dict[str, int] = {}
    expected: dict[str, tuple[int, int]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        shards = batch["shard"]
        for url in dict.fromkeys(shards.tolist()):
            mask = shards == url
            part = {k: v[mask] for k, v in batch.items()}
            pending.setdefault(url, []).append(part)
            have[url] = have.get(url, 0) + int(mask.sum())
            totals = part["shard_rows"][part["shard_rows"] >= 0]
            if len(totals):
                expected[url] = (int(totals[0]), int(part["shard_skipped"][part["shard_rows"] >= 0][0]))
            if url in expected and have[url] == expected[url][0]:
                rows = write_output(out, url, pending.pop(url), expected[url][1])
                stats.written.append(url)
                stats.samples += rows
                stats.embedded += rows
                stats.skipped_samples += expected[url][1]
                log.info(
                    "embed %s: %s complete (%d samples), %d/%d shards", label, url, rows, len(stats.written), len(items)
                )
