"""The WebDataset reader: split by Ray worker and DataLoader worker, shuffled, infinite, resumable mid-epoch.

Tar parsing is webdataset's (`tar_file_expander`, `group_by_keys`); cliplab owns the stages around it
so that the stream can be checkpointed. There are G = world_size x max(1, num_workers) logical readers;
reader g = rank * num_workers + slot. Each epoch, reader g takes shards[g::G] of a seeded permutation
(or, resampled, draws shards with replacement until samples_per_epoch // G samples), then rolls over
to the next epoch: the stream never ends, so every rank always has a batch and all ranks step equally.

Every batch carries its reader's cursor, packed into one int64 array (`cursor.py`): the next read
position (epoch, shard, sample), the positions (not bytes) of the samples in the shuffle buffer, and
the shuffle RNG state. Batches hold only the fields the objective reads (`fields.emitted`), and with
`data.decode: device` their images travel as JPEG bytes plus the drawn crop (`device_decode.py`).

A resumed reader re-reads from the oldest buffered position, refills the buffer with exactly those raw
samples (skipping others undecoded) and continues sample for sample as the uninterrupted stream would.
Augmentation randomness is a hash of (seed, epoch, shard, key), so it needs no state.

Not exact: changing data.num_workers, the shard list or the batch size between save and resume (refused
for num_workers and shards); a DataLoader worker stream that ends (impossible here, streams are infinite).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from cliplab.config import CaptionsConfig, DataConfig
from cliplab.data.augment import draw_train_view, eval_view, misaligned_view, normalised_box, train_view
from cliplab.data.captions import caption_slots, tokenize_slots
from cliplab.data.cursor import pack, reader_of, unpack
from cliplab.data.device_decode import encoded_payload, probe_jpeg
from cliplab.data.fields import emitted
from cliplab.data.loader_workers import LoaderWorkerInit
from cliplab.data.shards import expand_urls, open_shard
from cliplab.errors import DataError, StorageError

log = logging.getLogger("cliplab.data")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
Tokenizer = Callable[[list[str]], torch.Tensor]
Pos = tuple[int, int, int, int]  # epoch, shard index in the epoch's order, sample index in shard, read in epoch


def read_shard(url: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__` + bytes per extension) of one shard; a failure ends the shard and is recorded.

    Storage errors (endpoint unreachable past its budget, refused credentials) are raised, not recorded: the
    shard is fine, the storage is not, and skipping it would silently drop it from the epoch.
    """

    def record(exc: Exception) -> bool:
        if isinstance(exc, StorageError):
            raise exc
        errors.append(f"{url}: {type(exc).__name__}: {_reason(exc)}")
        return False

    try:
        stream = open_shard(url)
    except DataError as exc:
        errors.append(str(exc))
        return
    with stream:
        files = tar_file_expander([{"stream": stream, "url": url}], handler=record)
        yield from group_by_keys(files, handler=record)


def _reason(exc: Exception) -> str:
    """The exception's message without the stream webdataset appends (`... @ <stream repr>`)."""
    text = str(exc.args[0]) if exc.args else str(exc)
    return text.rsplit(" @ ", 1)[0]


def stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha1("|".join(map(str, parts)).encode()).digest()[:8], "little")


def decode(raw: dict[str, Any], caption_key: str) -> tuple[Image.Image, str, dict] | None:
    """(RGB image, caption, json) of a raw sample, or None when image or caption is missing or corrupt."""
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    text = decode_text(raw, caption_key)
    if image_key is None or text is None:
        return None
    try:
        img = Image.open(io.BytesIO(raw[image_key]))
        img = img.convert("RGB")
    except Exception:
        return None
    return img, *text


def decode_text(raw: dict[str, Any], caption_key: str) -> tuple[str, dict] | None:
    """(caption, json) of a raw sample, or None when the caption is missing or either is corrupt."""
    if caption_key not in raw:
        return None
    try:
        caption = raw[caption_key].decode("utf-8").strip()
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except Exception:
        return None
    return caption, meta if isinstance(meta, dict) else {}


class Reader:
    """One logical reader: its shard order per epoch, read position, shuffle buffer and skip counters."""

    def __init__(self, urls: list[str], cfg: DataConfig, g: int, num_readers: int, cursor: dict | None):
        self.urls, self.cfg, self.g, self.G = urls, cfg, g, num_readers
        self.quota = cfg.samples_per_epoch // num_readers if cfg.resampled and cfg.samples_per_epoch else None
        self.rng = random.Random(stable_seed(cfg.seed, "shuffle", g))
        self.read: Pos = (0, 0, 0, 0)
        self.buffer: list[tuple[Pos, dict]] = []
        self.skipped = {"samples": 0, "shards": 0}
        self.emitted = 0
        self._pending: list[Pos] = []
        if cursor is not None:
            self._load(cursor)

    def order(self, epoch: int, index: int) -> str | None:
        """The shard at `index` of this reader's order in `epoch` (None past the end of the epoch)."""
        if self.quota is not None:
            rng = random.Random(stable_seed(self.cfg.seed, "resample", epoch, self.g))
            picks = [rng.randrange(len(self.urls)) for _ in range(index + 1)]
            return self.urls[picks[-1]]
        perm = list(self.urls)
        random.Random(stable_seed(self.cfg.seed, "epoch", epoch)).shuffle(perm)
        mine = perm[self.g :: self.G]
        return mine[index] if index < len(mine) else None

    def raw(self, start: Pos) -> Iterator[tuple[Pos, dict]]:
        """Raw samples with their positions from `start` on, forever, skipping failed shards.

        Raises DataError once every distinct shard has failed or been empty in a row since the last
        readable one: a reader whose few shards of one epoch are bad keeps going, and a resampled
        reader over only bad shards stops instead of drawing forever.
        """
        epoch, shard, sample, in_epoch = start
        distinct = set(self.urls)
        dead: set[str] = set()
        while True:
            while (url := self.order(epoch, shard)) is not None:
                errors: list[str] = []
                j = -1
                for j, raw in enumerate(read_shard(url, errors)):
                    if j < sample:
                        continue
                    if self.quota is not None and in_epoch >= self.quota:
                        break
                    in_epoch += 1
                    yield (epoch, shard, j, in_epoch - 1), raw
                if errors or j < 0:
                    self._count_skipped(url, (epoch, shard), j + 1, errors)
                self._check_alive(url, j >= 0, dead, distinct)
                if self.quota is not None and in_epoch >= self.quota:
                    break
                shard, sample = shard + 1, 0
            epoch, shard, sample, in_epoch = epoch + 1, 0, 0, 0

    def _count_skipped(self, url: str, where: tuple[int, int], read: int, errors: list[str]) -> None:
        """Count and name a shard that failed part-way or gave nothing; a shard read before a resume is not
        counted again."""
        if where >= tuple(self.read[:2]):
            self.skipped["shards"] += 1
        reason = "; ".join(errors) or "no samples (an empty tar)"
        log.warning("skipped the rest of shard %s after %d samples: %s", url, read, reason)

    def _check_alive(self, url: str, gave_samples: bool, dead: set[str], distinct: set[str]) -> None:
        """Track the shards that failed or were empty in a row (a cut shard's first part counts as read) and
        raise DataError once that run covers every distinct shard."""
        if gave_samples:
            dead.clear()
            return
        dead.add(url)
        if dead >= distinct:
            raise DataError(
                f"reader {self.g}: none of the {len(distinct)} shards is readable "
                f"(first: {self.urls[0]}); check the URLs and credentials"
            )

    def samples(self) -> Iterator[tuple[int, dict]]:
        """(epoch, raw sample) after the shuffle buffer; updates the read position as it goes."""
        size = self.cfg.shuffle_buffer
        start = min([p for p in self._pending] + [self.read])
        restore = {p: i for i, p in enumerate(self._pending)}
        refill: list[tuple[Pos, dict] | None] = [None] * len(self._pending)
        for pos, raw in self.raw(start):
            if pos[:3] < self.read[:3]:
                if pos in restore:
                    refill[restore[pos]] = (pos, raw)
                continue
            if self._pending:
                self.buffer = [entry for entry in refill if entry is not None]
                self._pending = []
            self.read = _next(pos)
            if size <= 1:
                yield pos[0], raw
                continue
            self.buffer.append((pos, raw))
            if len(self.buffer) < size:
                continue
            k = self.rng.randrange(len(self.buffer))
            self.buffer[k], self.buffer[-1] = self.buffer[-1], self.buffer[k]
            out_pos, out = self.buffer.pop()
            yield out_pos[0], out

    def cursor(self) -> dict[str, Any]:
        version, state, gauss = self.rng.getstate()
        return {
            "reader": self.g,
            "readers": self.G,
            "read": list(self.read),
            "buffer": [list(p) for p, _ in self.buffer],
            "rng": [version, list(state), gauss],
            "emitted": self.emitted,
            "skipped": dict(self.skipped),
        }

    def _load(self, cursor: dict[str, Any]) -> None:
        if cursor["readers"] != self.G:
            raise DataError(
                f"data position was saved with {cursor['readers']} readers (Ray workers x "
                f"data.num_workers), this run has {self.G}; resume with the same scaling.num_workers "
                "and data.num_workers"
            )
        self.read = tuple(cursor["read"])
        self._pending = [tuple(p) for p in cursor["buffer"]]
        version, state, gauss = cursor["rng"]
        self.rng.setstate((version, tuple(state), gauss))
        self.emitted = cursor["emitted"]
        self.skipped = dict(cursor["skipped"])


def _next(pos: Pos) -> Pos:
    return pos[0], pos[1], pos[2] + 1, pos[3] + 1


Row = tuple[str, str, dict, dict, list[dict]]  # key, caption, json, train view, misaligned views
VIEW_FIELDS = frozenset({"views", "view_boxes", "view_flip", "view_jitter"})


class TrainStream(IterableDataset):
    """Batches of decoded, augmented, tokenised samples from this DataLoader worker's logical reader."""

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        tokenizer: Tokenizer,
        mean: Sequence[float],
        std: Sequence[float],
        rank: int,
        world_size: int,
        position: dict | None,
        fields: frozenset[str],
    ):
        self.cfg, self.urls, self.tokenizer, self.mean, self.std = cfg, urls, tokenizer, mean, std
        self.rank, self.world = rank, world_size
        self.slots = max(1, cfg.num_workers)
        self.position = position or {}
        self.fields = fields

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
        worker = info.id if info is not None else 0
        slot = (worker + self.position.get("rotation", 0)) % self.slots
        g = self.rank * self.slots + slot
        reader = Reader(self.urls, self.cfg, g, self.world * self.slots, self.position.get("readers", {}).get(str(g)))
        stream = reader.samples()
        while True:
            rows: list[Row] = []
            while len(rows) < self.cfg.batch_size:
                epoch, raw = next(stream)
                row = self._row(epoch, raw)
                if row is None:
                    reader.skipped["samples"] += 1
                    log.warning(
                        "skipped sample %s in %s: missing or undecodable image or caption",
                        raw.get("__key__"),
                        raw.get("__url__"),
                    )
                    continue
                rows.append(row)
            reader.emitted += len(rows)
            yield {**self._batch(rows), "__cursor__": pack(reader.cursor())}

    def _row(self, epoch: int, raw: dict[str, Any]) -> Row | None:
        """One sample's key, caption, json, train view and misaligned views; None if it cannot be used."""
        rng = random.Random(stable_seed(self.cfg.seed, epoch, raw.get("__url__"), raw["__key__"]))
        probe = probe_jpeg(raw) if self.cfg.decode == "device" else None
        if probe is not None:
            text = decode_text(raw, self.cfg.caption_key)
            if text is None:
                return None
            data, width, height = probe
            box, flip = draw_train_view(width, height, self.cfg, rng)
            anchor = {"image": (data, box, flip), "crop_box": normalised_box(box, width, height), "flip": flip}
            return raw["__key__"], *text, anchor, []
        decoded = decode(raw, self.cfg.caption_key)
        if decoded is None:
            return None
        img, caption, meta = decoded
        anchor = train_view(img, self.cfg, self.mean, self.std, rng)
        count = self.cfg.views.count if self.fields & VIEW_FIELDS else 0
        views = [misaligned_view(img, self.cfg, self.mean, self.std, rng) for _ in range(count)]
        return raw["__key__"], caption, meta, anchor, views

    def _batch(self, rows: list[Row]) -> dict[str, Any]:
        """The batch of `rows`, with only the fields this loader emits."""
        want = self.fields
        images = [r[3]["image"] for r in rows]
        batch: dict[str, Any] = (
            encoded_payload(images) if self.cfg.decode == "device" else {"image": torch.stack(images)}
        )
        if "text" in want:
            batch["text"] = self.tokenizer([r[1] for r in rows])
        if "crop_box" in want:
            batch["crop_box"] = torch.stack([r[3]["crop_box"] for r in rows])
        if "flip" in want:
            batch["flip"] = torch.tensor([r[3]["flip"] for r in rows])
        if "key" in want:
            batch["key"] = [r[0] for r in rows]
        if "json" in want:
            batch["json"] = [r[2] for r in rows]
        if self.cfg.captions is not None and want & {"texts", "caption_own"}:
            slots = tokenize_slots([caption_slots(r[1], r[2], self.cfg.captions) for r in rows], self.tokenizer)
            batch.update({k: v for k, v in slots.items() if k in want})
        if self.cfg.views.count and want & VIEW_FIELDS:
            batch.update({k: v for k, v in _stack_views([r[4] for r in rows]).items() if k in want})
        return batch


def _stack_views(views: list[list[dict]]) -> dict[str, torch.Tensor]:
    """(B, V, ...) tensors of the misaligned views: images, crop boxes, flips, jitter strengths."""
    return {
        "views": torch.stack([torch.stack([v["image"] for v in row]) for row in views]),
        "view_boxes": torch.stack([torch.stack([v["crop_box"] for v in row]) for row in views]),
        "view_flip": torch.tensor([[v["flip"] for v in row] for row in views]),
        "view_jitter": torch.tensor([[v["jitter"] for v in row] for row in views], dtype=torch.float32),
    }


class StreamPosition:
    """What the train loop checkpoints: the latest cursor of each reader it consumed, and the batch count."""

    def __init__(self, slots: int, state: dict | None = None):
        state = state or {}
        self.slots = slots
        self.readers: dict[str, dict | np.ndarray] = dict(state.get("readers", {}))
        self.batches = int(state.get("batches", 0))
        self.rotation = int(state.get("rotation", 0))

    def update(self, batch: dict[str, Any]) -> None:
        """Keep the batch's packed cursor as it came (unpacked only when a state is asked for)."""
        packed = batch["__cursor__"]
        self.readers[str(reader_of(packed))] = packed
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        readers = {g: unpack(c) if isinstance(c, np.ndarray) else c for g, c in self.readers.items()}
        skipped = {"samples": 0, "shards": 0}
        for cursor in readers.values():
            for key in skipped:
                skipped[key] += cursor["skipped"][key]
        rotation = (self.rotation + self.batches) % self.slots
        return {"readers": readers, "batches": self.batches, "rotation": rotation, "skipped": skipped}


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """Batches are made in the worker; skip DataLoader's default conversion (it would copy the cursor array)."""
    return batch


def resolve_pin_memory(cfg: DataConfig, device: torch.device) -> bool:
    """`data.pin_memory`, where unset: on when the worker trains on a GPU (pinned copies can run asynchronously)."""
    return cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"


def make_train_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    mean: Sequence[float],
    std: Sequence[float],
    rank: int,
    world_size: int,
    position: dict | None,
    fields: frozenset[str] | None = None,
    pin_memory: bool = False,
) -> tuple[DataLoader, StreamPosition]:
    """The DataLoader (batches built in its workers) and the position tracker to checkpoint.

    `fields`: the batch fields the objective reads (None: every field the config makes).
    """
    urls = expand_urls(cfg.train_shards)
    slots = max(1, cfg.num_workers)
    if not cfg.resampled and len(urls) < world_size * slots:
        raise DataError(
            f"data.train_shards: {len(urls)} shards for {world_size} Ray workers x {slots} loader "
            f"workers; need at least {world_size * slots} shards, or set data.resampled"
        )
    start = {"readers": position["readers"], "rotation": position["rotation"]} if position else None
    stream = TrainStream(cfg, urls, tokenizer, mean, std, rank, world_size, start, emitted(cfg, fields))
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        multiprocessing_context="fork" if cfg.num_workers else None,
        prefetch_factor=2 if cfg.num_workers else None,
        worker_init_fn=LoaderWorkerInit(os.getpid()),
    )
    return loader, StreamPosition(slots, start)


def held_out_samples(
    spec: str, caption_key: str, rank: int, world_size: int, max_samples: int
) -> Iterator[tuple[str, Image.Image, str, dict]]:
    """This rank's share of the first `max_samples` held-out samples: (key, image, caption, json).

    Every rank reads every shard in order and keeps the samples whose global index i has i % W == rank,
    so the ranks' shares are disjoint and together cover exactly the first max_samples samples, whatever
    the number of shards. The index counts samples with an image and a caption; one whose bytes then fail
    to decode is logged and dropped by its rank.
    """
    index = 0
    for url in expand_urls(spec):
        errors: list[str] = []
        for raw in read_shard(url, errors):
            if index >= max_samples:
                break
            if caption_key not in raw or not any(k in raw for k in IMAGE_KEYS):
                continue
            index += 1
            if (index - 1) % world_size != rank:
                continue
            decoded = decode(raw, caption_key)
            if decoded is None:
                log.warning("eval: skipped sample %s in %s: undecodable image or caption", raw["__key__"], url)
                continue
            yield (raw["__key__"], *decoded)
        if errors:
            log.warning("eval: %s", "; ".join(errors))
        if index >= max_samples:
            return


def eval_batches(
    spec: str,
    batch_size: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    tokenizer: Tokenizer,
    caption_key: str,
    rank: int,
    world_size: int,
    max_samples: int,
    captions: CaptionsConfig | None = None,
) -> Iterator[dict[str, Any]]:
    """Held-out batches without augmentation: this rank's share of `held_out_samples`.

    With `captions`, batches also carry every caption slot (`texts`, `caption_own`)."""
    rows: list[tuple[str, str, dict, torch.Tensor]] = []
    for key, img, caption, meta in held_out_samples(spec, caption_key, rank, world_size, max_samples):
        rows.append((key, caption, meta, eval_view(img, image_size, mean, std)))
        if len(rows) == batch_size:
            yield _eval_batch(rows, tokenizer, captions)
            rows = []
    if rows:
        yield _eval_batch(rows, tokenizer, captions)


def _eval_batch(
    rows: list[tuple[str, str, dict, torch.Tensor]], tokenizer: Tokenizer, captions: CaptionsConfig | None
) -> dict[str, Any]:
    batch = {
        "image": torch.stack([r[3] for r in rows]),
        "text": tokenizer([r[1] for r in rows]),
        "caption": [r[1] for r in rows],
        "key": [r[0] for r in rows],
        "json": [r[2] for r in rows],
    }
    if captions is not None:
        slots = [caption_slots(r[1], r[2], captions) for r in rows]
        batch.update(tokenize_slots(slots, tokenizer), slot_texts=[texts for texts, _ in slots])
    return batch


def inspect_shards(spec: str, n_show: int = 1) -> dict[str, Any]:
    """Counts per shard, extensions seen, unreadable shards/samples, and the first samples' contents."""
    per_shard: dict[str, int] = {}
    extensions: dict[str, int] = {}
    bad_samples, errors, shown = 0, [], []
    for url in expand_urls(spec):
        shard_errors: list[str] = []
        n = 0
        for raw in read_shard(url, shard_errors):
            n += 1
            for ext in raw:
                if not ext.startswith("__"):
                    extensions[ext] = extensions.get(ext, 0) + 1
            decoded = decode(raw, "txt")
            if decoded is None:
                bad_samples += 1
            elif len(shown) < n_show:
                img, caption, meta = decoded
                shown.append(
                    {"key": raw["__key__"], "url": url, "image_size": list(img.size), "caption": caption, "json": meta}
                )
        per_shard[url] = n
        errors += shard_errors or ([f"{url}: no samples (an empty tar)"] if n == 0 else [])
    if not any(per_shard.values()):
        raise DataError(f"{spec}: no samples in its {len(per_shard)} shard(s): {'; '.join(errors[:3])}")
    return {
        "shards": len(per_shard),
        "samples": sum(per_shard.values()),
        "per_shard": per_shard,
        "extensions": extensions,
        "undecodable_samples": bad_samples,
        "shard_errors": errors,
        "examples": shown,
    }
