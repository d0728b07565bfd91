"""The WebDataset reader: split by Ray worker and DataLoader worker, shuffled, infinite, resumable mid-epoch.

Tar parsing is webdataset's (`tar_file_expander`, `group_by_keys`) over file objects from `open_shard`;
cliplab owns the stages around it so that the stream can be checkpointed. There are G = world_size x
max(1, num_workers) logical readers; reader g = rank * max(1, num_workers) + slot. Each epoch e, reader
g takes shards[g::G] of a permutation seeded by (seed, e), or, resampled, draws shards with replacement
(seeded by (seed, e, g)) until it has read samples_per_epoch // G raw samples. Then it rolls over to
epoch e + 1: the stream never ends, so every rank always has a batch and all ranks step equally. Batches
are made in the DataLoader worker, are always full and may span an epoch boundary.

Every batch carries `__cursor__`, its reader's state after making it (see `Reader.cursor`): the read
position (epoch, shard index in the epoch's order, raw samples read from that shard), the positions (not
bytes) of the samples in the shuffle buffer, and the shuffle RNG state (seeded by (seed, e, g) when the
reader enters epoch e). A resumed reader re-reads from the oldest buffered position, refills the buffer
with exactly those raw samples (others are skipped undecoded) and continues sample for sample as the
uninterrupted stream would. Augmentation randomness is a stable hash of (seed, epoch, sample key), so it
needs no state. `StreamPosition` keeps the latest consumed cursor of each reader and the batch count n;
a resumed loader rotates readers over DataLoader workers by n % num_workers, as batch k of a DataLoader
comes from worker k % num_workers: the batch order is the uninterrupted one too.

Not exact (documented limits):
- resuming with another world size, data.num_workers, seed, resampled setting or shard list: the layout
  change is refused; a changed shard list, seed or batch size is not detected and gives another stream;
- a shard whose readability changed between save and resume (transient S3 errors, files replaced):
  buffered samples that can no longer be read are dropped, and the streams diverge from there;
- skip counters of a reader whose batches were prefetched but not consumed count again after a resume
  (they are counted when their batch is consumed, so totals stay exact; only log lines repeat);
- keys are assumed unique per epoch: two samples with the same key in one epoch (e.g. a resampled shard
  drawn twice) get the same augmentation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from cliplab.config import DataConfig
from cliplab.data.augment import eval_box, eval_view, misaligned_view, train_view
from cliplab.data.shards import expand_urls, open_shard
from cliplab.errors import DataError

log = logging.getLogger("cliplab.data")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
Tokenizer = Callable[[list[str]], torch.Tensor]
Pos = tuple[int, int, int, int]  # epoch, shard index in the epoch's order, sample index in shard, sample in epoch


def read_shard(url: str, errors: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples (`__key__` + bytes per extension) of one shard; a failure ends the shard and is recorded."""

    def record(exc: Exception) -> bool:
        reason = str(exc.args[0]).split(" @ ")[0] if exc.args else ""
        errors.append(f"shard {url}: {type(exc).__name__}: {reason}")
        return False

    try:
        stream = open_shard(url)
    except DataError as exc:
        errors.append(str(exc))
        return
    with stream:
        files = tar_file_expander([{"stream": stream, "url": url}], handler=record)
        yield from group_by_keys(files, handler=record)


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from the parts' text (sha1: the same in every process, unlike `hash`)."""
    return int.from_bytes(hashlib.sha1("|".join(map(str, parts)).encode()).digest()[:8], "little")


def decode(raw: dict[str, Any], caption_key: str) -> tuple[Image.Image, str, dict] | None:
    """(RGB image, caption, json) of a raw sample, or None when image or caption is missing or corrupt."""
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None or caption_key not in raw:
        return None
    try:
        img = Image.open(io.BytesIO(raw[image_key]))
        img = img.convert("RGB")
        caption = raw[caption_key].decode("utf-8").strip()
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except Exception:
        return None
    return img, caption, meta if isinstance(meta, dict) else {}


class Reader:
    """One logical reader: its shard order per epoch, read position, shuffle buffer and skip counters."""

    def __init__(self, urls: list[str], cfg: DataConfig, g: int, num_readers: int, cursor: dict | None = None):
        self.urls, self.cfg, self.g, self.G = urls, cfg, g, num_readers
        self.quota = cfg.samples_per_epoch // num_readers if cfg.resampled and cfg.samples_per_epoch else None
        self.rng = self._shuffle_rng(0)
        self.read: Pos = (0, 0, 0, 0)
        self.buffer: list[tuple[Pos, dict]] = []
        self.skipped = {"samples": 0, "shards": 0}
        self.errors: list[str] = []
        self.emitted = 0
        self._reported = dict(self.skipped)
        self._pending: list[Pos] = []
        self._order: tuple[int, list[str]] = (-1, [])
        self._draws: tuple[int, random.Random | None, list[str]] = (-1, None, [])
        if cursor is not None:
            self._load(cursor)

    def _shuffle_rng(self, epoch: int) -> random.Random:
        return random.Random(stable_seed(self.cfg.seed, "shuffle", epoch, self.g))

    def shard_url(self, epoch: int, index: int) -> str | None:
        """The shard at `index` of this reader's order in `epoch` (None past the end of a non-resampled epoch)."""
        if self.quota is not None:
            if self._draws[0] != epoch:
                self._draws = (epoch, random.Random(stable_seed(self.cfg.seed, "resample", epoch, self.g)), [])
            _, rng, drawn = self._draws
            while len(drawn) <= index:
                drawn.append(self.urls[rng.randrange(len(self.urls))])
            return drawn[index]
        if self._order[0] != epoch:
            perm = list(self.urls)
            random.Random(stable_seed(self.cfg.seed, "epoch", epoch)).shuffle(perm)
            self._order = (epoch, perm[self.g :: self.G])
        mine = self._order[1]
        return mine[index] if index < len(mine) else None

    def raw(self, start: Pos) -> Iterator[tuple[Pos, dict]]:
        """Raw samples with their positions from `start` on, forever; failed shards are skipped and recorded."""
        epoch, shard, offset, in_epoch = start
        while True:
            whole_epoch, readable, failed_in_a_row = shard == 0 and offset == 0, False, set()
            while (self.quota is None or in_epoch < self.quota) and (url := self.shard_url(epoch, shard)):
                errors: list[str] = []
                n = 0
                for j, raw in enumerate(read_shard(url, errors)):
                    n = j + 1
                    if j < offset:
                        continue
                    if self.quota is not None and in_epoch >= self.quota:
                        break
                    yield (epoch, shard, j, in_epoch), raw
                    in_epoch += 1
                if errors:
                    self._shard_failed(epoch, shard, url, n, errors)
                readable |= n > 0
                failed_in_a_row = set() if n else failed_in_a_row | {url}
                if len(failed_in_a_row) == len(set(self.urls)):
                    raise DataError(f"reader {self.g}: every one of the {len(failed_in_a_row)} shards failed or "
                                    f"is empty (first: {self.urls[0]}); check the URLs and credentials")
                shard, offset = shard + 1, 0
            if whole_epoch and not readable:
                raise DataError(f"reader {self.g}: no readable sample in any of its shards in epoch {epoch} "
                                f"(first of all: {self.urls[0]}); check the URLs and credentials")
            epoch, shard, offset, in_epoch = epoch + 1, 0, 0, 0

    def _shard_failed(self, epoch: int, shard: int, url: str, n: int, errors: list[str]) -> None:
        if (epoch, shard) < self.read[:2]:
            return  # re-read while resuming: counted and logged before the checkpoint
        self.skipped["shards"] += 1
        message = f"{'; '.join(errors)} (kept the {n} samples before the failure)" if n else "; ".join(errors)
        self.errors.append(message)
        log.warning("reader %d skipped shard %s: %s", self.g, url, message)

    def samples(self) -> Iterator[tuple[int, dict]]:
        """(epoch, raw sample) after the shuffle buffer; updates the read position as it goes."""
        size = self.cfg.shuffle_buffer
        wanted = {p[:3]: i for i, p in enumerate(self._pending)}
        refill: list[tuple[Pos, dict] | None] = [None] * len(self._pending)
        for pos, raw in self.raw(min([*self._pending, self.read])):
            if pos[:3] < self.read[:3]:
                if pos[:3] in wanted:
                    refill[wanted[pos[:3]]] = (pos, raw)
                continue
            if self._pending:
                self.buffer = [entry for entry in refill if entry is not None]
                self._pending, refill = [], []
            if pos[0] > self.read[0]:
                self.rng = self._shuffle_rng(pos[0])
            self.read = (pos[0], pos[1], pos[2] + 1, pos[3] + 1)
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
        """JSON-serialisable state: read position, buffered positions, shuffle RNG, emitted and skipped totals."""
        version, state, gauss = self.rng.getstate()
        epoch, shard, offset, in_epoch = self.read
        return {"reader": self.g, "readers": self.G, "epoch": epoch, "shard": shard, "offset": offset,
                "in_epoch": in_epoch, "buffer": [list(p) for p, _ in self.buffer], "rng": [version, list(state), gauss],
                "emitted": self.emitted, "skipped": dict(self.skipped)}

    def take_skipped(self) -> dict[str, Any]:
        """What was skipped since the previous call: sample and shard counts, and each bad shard's message."""
        out = {k: self.skipped[k] - self._reported[k] for k in self.skipped}
        out["shard_errors"], self.errors, self._reported = self.errors, [], dict(self.skipped)
        return out

    def _load(self, cursor: dict[str, Any]) -> None:
        self.read = (cursor["epoch"], cursor["shard"], cursor["offset"], cursor["in_epoch"])
        self._pending = [tuple(p) for p in cursor["buffer"]]
        version, state, gauss = cursor["rng"]
        self.rng.setstate((version, tuple(state), gauss))
        self.emitted = cursor["emitted"]
        self.skipped = dict(cursor["skipped"])
        self._reported = dict(self.skipped)


class TrainStream(IterableDataset):
    """Batches of decoded, augmented, tokenised samples from this DataLoader worker's logical reader."""

    def __init__(self, cfg: DataConfig, urls: list[str], tokenizer: Tokenizer, mean: Sequence[float],
                 std: Sequence[float], rank: int, world_size: int, position: dict | None):
        self.cfg, self.urls, self.tokenizer, self.mean, self.std = cfg, urls, tokenizer, mean, std
        self.rank, self.world = rank, world_size
        self.slots = max(1, cfg.num_workers)
        self.position = position or {}

    def reader(self) -> Reader:
        """The logical reader this process serves: DataLoader worker ids rotated by consumed batches."""
        info = get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
        worker = info.id if info is not None else 0
        slot = (worker + self.position.get("batches", 0)) % self.slots
        g = self.rank * self.slots + slot
        return Reader(self.urls, self.cfg, g, self.world * self.slots, self.position.get("readers", {}).get(str(g)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader = self.reader()
        stream = reader.samples()
        while True:
            rows = []
            while len(rows) < self.cfg.batch_size:
                epoch, raw = next(stream)
                decoded = decode(raw, self.cfg.caption_key)
                if decoded is None:
                    reader.skipped["samples"] += 1
                    log.warning("skipped sample %s of %s: missing or undecodable image or caption",
                                raw.get("__key__"), raw.get("__url__"))
                    continue
                img, caption, meta = decoded
                rng = random.Random(stable_seed(self.cfg.seed, epoch, raw["__key__"]))
                anchor = train_view(img, self.cfg, self.mean, self.std, rng)
                views = [misaligned_view(img, self.cfg, self.mean, self.std, rng) for _ in range(self.cfg.views.count)]
                rows.append((raw["__key__"], caption, meta, anchor, views))
            reader.emitted += len(rows)
            batch = {
                "image": torch.stack([r[3]["image"] for r in rows]),
                "text": self.tokenizer([r[1] for r in rows]),
                "crop_box": torch.stack([r[3]["crop_box"] for r in rows]),
                "flip": torch.tensor([r[3]["flip"] for r in rows]),
                "key": [r[0] for r in rows],
                "json": [r[2] for r in rows],
                "__cursor__": reader.cursor(),
                "__skipped__": reader.take_skipped(),
            }
            if self.cfg.views.count:
                batch.update(_stack_views([r[4] for r in rows]))
            yield batch


def _stack_views(views: list[list[dict]]) -> dict[str, torch.Tensor]:
    """(B, V, ...) tensors of the misaligned views: images, crop boxes, flips, jitter strengths."""
    return {
        "views": torch.stack([torch.stack([v["image"] for v in row]) for row in views]),
        "view_boxes": torch.stack([torch.stack([v["crop_box"] for v in row]) for row in views]),
        "view_flip": torch.tensor([[v["flip"] for v in row] for row in views]),
        "view_jitter": torch.tensor([[v["jitter"] for v in row] for row in views], dtype=torch.float32),
    }


class StreamPosition:
    """What the train loop checkpoints per rank: each reader's latest consumed cursor and the batch count."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.readers: dict[str, dict] = dict(state.get("readers", {}))
        self.batches = int(state.get("batches", 0))

    def update(self, batch: dict[str, Any]) -> None:
        """Record a batch the train loop consumed."""
        cursor = batch["__cursor__"]
        self.readers[str(cursor["reader"])] = cursor
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        """{"readers": {g: cursor}, "batches": n consumed, "skipped": totals over this rank's readers}."""
        skipped = {"samples": 0, "shards": 0}
        for cursor in self.readers.values():
            for key in skipped:
                skipped[key] += cursor["skipped"][key]
        return {"readers": dict(self.readers), "batches": self.batches, "skipped": skipped}


def _check_layout(position: dict, rank: int, slots: int, readers: int) -> None:
    for g, cursor in position.get("readers", {}).items():
        if cursor["readers"] != readers or int(g) // slots != rank:
            raise DataError(f"data position of reader {g} was saved with {cursor['readers']} readers (Ray workers x "
                            f"data.num_workers) and belongs to rank {int(g) // slots} of that layout; this run has "
                            f"{readers} readers; resume with the same scaling.num_workers and data.num_workers")


def make_train_loader(cfg: DataConfig, tokenizer: Tokenizer, mean: Sequence[float], std: Sequence[float], rank: int,
                      world_size: int, position: dict | None) -> tuple[DataLoader, StreamPosition]:
    """The DataLoader (infinite; batches built in its workers) and the position tracker to checkpoint."""
    urls = expand_urls(cfg.train_shards)
    slots = max(1, cfg.num_workers)
    if not cfg.resampled and len(urls) < world_size * slots:
        raise DataError(f"data.train_shards: {len(urls)} shards for {world_size} Ray workers x {slots} loader "
                        f"workers; need at least {world_size * slots} shards, or set data.resampled")
    if position:
        _check_layout(position, rank, slots, world_size * slots)
    stream = TrainStream(cfg, urls, tokenizer, mean, std, rank, world_size, position)
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers, persistent_workers=False,
                        multiprocessing_context="fork" if cfg.num_workers else None,
                        prefetch_factor=2 if cfg.num_workers else None)
    return loader, StreamPosition(position)


def eval_batches(urls_spec: str, batch_size: int, image_size: int, mean: Sequence[float], std: Sequence[float],
                 tokenizer: Tokenizer, caption_key: str, rank: int, world_size: int,
                 max_samples: int) -> Iterator[dict[str, Any]]:
    """Held-out batches without augmentation: the first max_samples raw samples in shard order, split by shard.

    Rank r decodes shards[r::W] and keeps the samples whose global index (samples of all earlier shards
    before them) is below max_samples, so the evaluated set is the same for every world size, and disjoint
    across ranks. The sample counts of other ranks' earlier shards are read undecoded; undecodable samples
    are dropped and counted in `__skipped__`.
    """
    urls = expand_urls(urls_spec)
    mine = range(rank, len(urls), world_size)
    rows: list[tuple[str, str, dict, torch.Tensor, tuple]] = []
    skipped: dict[str, Any] = {"samples": 0, "shards": 0, "shard_errors": []}
    first = 0  # global index of the current shard's first sample
    for i, url in enumerate(urls[: mine[-1] + 1] if mine else []):
        if first >= max_samples:
            break
        errors: list[str] = []
        if i % world_size != rank:
            first += sum(1 for _ in islice(read_shard(url, errors), max_samples - first))
            continue
        n = 0
        for n, raw in enumerate(read_shard(url, errors), start=1):
            if first + n > max_samples:
                break
            decoded = decode(raw, caption_key)
            if decoded is None:
                skipped["samples"] += 1
                continue
            img, caption, meta = decoded
            rows.append((raw["__key__"], caption, meta, eval_view(img, image_size, mean, std),
                         eval_box(img.width, img.height, image_size)))
            if len(rows) == batch_size:
                yield _eval_batch(rows, tokenizer, skipped)
                rows, skipped = [], {"samples": 0, "shards": 0, "shard_errors": []}
        first += n
        if errors:
            log.warning("eval: skipped the rest of %s", "; ".join(errors))
            skipped["shards"] += 1
            skipped["shard_errors"] += errors
    if rows:
        yield _eval_batch(rows, tokenizer, skipped)


def _eval_batch(rows: list[tuple[str, str, dict, torch.Tensor, tuple]], tokenizer: Tokenizer,
                skipped: dict[str, Any]) -> dict[str, Any]:
    return {"image": torch.stack([r[3] for r in rows]), "text": tokenizer([r[1] for r in rows]),
            "crop_box": torch.tensor([r[4] for r in rows], dtype=torch.float32),
            "flip": torch.zeros(len(rows), dtype=torch.bool), "key": [r[0] for r in rows],
            "json": [r[2] for r in rows], "__skipped__": skipped}


def inspect_shards(urls_spec: str, n_show: int = 1, caption_key: str = "txt") -> dict[str, Any]:
    """Shard and sample counts, extensions seen, corrupt shards/samples, and the first samples' contents."""
    per_shard: dict[str, int] = {}
    extensions: dict[str, int] = {}
    bad_samples, errors, shown, bad_shards = 0, [], [], 0
    for url in expand_urls(urls_spec):
        shard_errors: list[str] = []
        n = 0
        for raw in read_shard(url, shard_errors):
            n += 1
            for ext in raw:
                if not ext.startswith("__"):
                    extensions[ext] = extensions.get(ext, 0) + 1
            decoded = decode(raw, caption_key)
            if decoded is None:
                bad_samples += 1
            elif len(shown) < n_show:
                img, caption, meta = decoded
                shown.append({"key": raw["__key__"], "url": url, "image_size": list(img.size), "caption": caption,
                              "json": meta})
        per_shard[url] = n
        bad_shards += bool(shard_errors)
        errors += shard_errors
    return {"shards": len(per_shard), "samples": sum(per_shard.values()), "per_shard": per_shard,
            "extensions": extensions, "undecodable_samples": bad_samples, "corrupt_shards": bad_shards,
            "shard_errors": errors, "examples": shown}
