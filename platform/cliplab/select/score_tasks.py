"""The scoring pass on Ray Data: every score of the pool out of core, only per-sample scalars back to the driver.

The pool is never assembled anywhere: `from_items(parts, override_num_blocks=len(parts))` gives one read
task per complete shard output (pool.py), which numbers its rows with their global pool index (the
shard's offset plus the row's position in the file: the order the negCLIPLoss partitions index).

- CLIPScore (spec eq. 1) and NormSim_p (eq. 4) run in a fixed actor pool (`ActorPoolStrategy`, one GPU
  per actor when `score.gpus_per_actor` > 0): each actor reads the target image embeddings from the
  target's parquet outputs once, in its constructor, and keeps them on its device (the target is
  replicated once per actor, never sent through the driver); `scores.clip_score` and
  `scores.norm_sim` (chunked matmul) do the math.
- negCLIPLoss (eq. 3): each of the K partitions cuts the pool into windows of whole shards
  (`scores.draw_windows`, at least W = `window_batches` x |B| rows, the whole pool when it has fewer
  than 2W), drawn by the driver as lists of shard numbers. One task per (partition, window) runs in
  a second actor pool: it reads its window's shard outputs, draws the batches inside the window and
  computes their normalisers (`scores.window_normalisers`, the function the in-process
  `neg_clip_loss` calls), and returns (row, R term) for every row of the window.

Everything that reaches the driver is a row index with float scores. Nothing is shuffled: a task holds
one window (fewer than 2W rows plus one shard), so memory is bounded by W and the shard size, not by
the pool, and every partition reads the pool's embeddings once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from cliplab.select.config import NegClipConfig, ScoreConfig, ScoresConfig, normsim_name
from cliplab.select.embed import actor_gpus
from cliplab.select.pool import PoolIndex, ShardPart, embedding_matrix, read_embeddings, read_part
from cliplab.select.scores import (
    Batches,
    Window,
    clip_score,
    norm_sim,
    plan_windows,
    window_normalisers,
    window_rows_of,
)

log = logging.getLogger("cliplab.select")
READ_CHUNK = 4096  # rows per block out of a read task
_target_loads = 0  # times this worker process loaded a target (once per scoring actor)


@dataclass
class ScoreResult:
    """Every score (pool order), the negCLIPLoss batching used, seconds per pass, target loads per actor."""

    scores: dict[str, np.ndarray]
    batches: Batches | None
    seconds: dict[str, float] = field(default_factory=dict)
    target_loads: dict[int, int] = field(default_factory=dict)  # scoring actor's pid -> target loads seen


def read_rows(batch: dict[str, np.ndarray], out: str, threads: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data read UDF: the embeddings of each shard output in `batch`, rows numbered by their pool index."""
    torch.set_num_threads(threads)
    for part in map(ShardPart, *(batch[k].tolist() for k in ("url", "path", "offset", "rows"))):
        image, text = read_embeddings(out, part)
        for s in range(0, part.rows, READ_CHUNK):
            stop = min(s + READ_CHUNK, part.rows)
            yield {"idx": np.arange(part.offset + s, part.offset + stop), "image": image[s:stop], "text": text[s:stop]}


def load_target(target: PoolIndex, device: torch.device) -> torch.Tensor:
    """The target's (T, d) float16 image embeddings on `device`, read from its shard outputs (spec eq. 5)."""
    global _target_loads
    _target_loads += 1
    parts = [embedding_matrix(read_part(target.out, p, ["image_emb"]).column("image_emb")) for p in target.parts]
    return torch.from_numpy(np.concatenate(parts)).to(device)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ScoreActor:
    """Ray Data actor: CLIPScore and NormSim_p of its batches, against the target it loaded once."""

    def __init__(self, target: PoolIndex | None, ps: list[float], threads: int):
        torch.set_num_threads(threads)
        self.device = _device()
        self.ps = ps
        self.target = load_target(target, self.device) if target is not None else None

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        image, text = batch["image"], batch["text"]
        out = {"idx": batch["idx"], "clipscore": clip_score(image, text, self.device)}
        for p in self.ps if self.target is not None else []:
            out[normsim_name(p)] = norm_sim(image, self.target, p, self.device)
        out["actor"] = np.full(len(image), os.getpid(), dtype=np.int64)
        out["target_loads"] = np.full(len(image), _target_loads, dtype=np.int32)
        return out


class WindowActor:
    """Ray Data actor: the R terms of eq. 3 from one partition for every row of one window of the pool.

    Every window of the plan comes with the constructor (a few shard numbers each); a call names one.
    """

    def __init__(self, pool: PoolIndex, windows: list[Window], tau: float, batch_size: int, seed: int, threads: int):
        torch.set_num_threads(threads)
        self.device, self.pool, self.windows = _device(), pool, windows
        self.tau, self.batch_size, self.seed = tau, batch_size, seed

    @torch.no_grad()
    def __call__(self, item: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        w = self.windows[int(item["window"][0])]
        parts = [read_embeddings(self.pool.out, self.pool.parts[s]) for s in w.shards]
        image, text = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        norm = window_normalisers(image, text, self.tau, self.batch_size, w.repeat, self.seed, w.index, self.device)
        return {"idx": window_rows_of(w.shards, self.pool.sizes), "norm": norm}


def _rows_dataset(pool: PoolIndex, res: ScoreConfig) -> ray.data.Dataset:
    items = [asdict(p) for p in pool.parts]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    threads = max(1, int(res.cpus_per_read))
    return ds.map_batches(
        read_rows, batch_size=1, num_cpus=res.cpus_per_read, fn_kwargs={"out": pool.out, "threads": threads}
    )


def _actor_args(res: ScoreConfig) -> dict[str, Any]:
    gpus = actor_gpus(res)
    args: dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(size=res.actors), "num_cpus": res.cpus_per_actor}
    if gpus:
        args["num_gpus"] = gpus
    if res.memory_per_actor_gb:
        args["memory"] = res.memory_per_actor_gb * 2**30
    return args


class _Progress:
    """Logs `samples done/total` of one pass about every tenth of it."""

    def __init__(self, stage: str, total: int):
        self.stage, self.total, self.done, self.next = stage, total, 0, total / 10

    def add(self, rows: int) -> None:
        self.done += rows
        if self.done >= self.next:
            log.info("select: %s %d/%d", self.stage, min(self.done, self.total), self.total)
            self.next = self.done + self.total / 10


def score_pool(
    pool: PoolIndex, target: PoolIndex | None, cfg: ScoresConfig, tau: float, res: ScoreConfig
) -> ScoreResult:
    """Every configured score of the pool (clipscore, normsim_*, negclip) as float32 arrays in pool order."""
    n = len(pool)
    ps = [math.inf if p == "inf" else float(p) for p in cfg.normsim_p] if target is not None else []
    threads = max(1, int(res.cpus_per_actor))
    log.info(
        "select: scoring %d samples in %d actor(s) (%g GPU each); CLIPScore%s",
        n,
        res.actors,
        actor_gpus(res),
        "".join(f", {normsim_name(p)} against {len(target)} target rows" for p in ps) if target else "",
    )
    t0 = time.perf_counter()
    ds = _rows_dataset(pool, res).map_batches(
        ScoreActor,
        fn_constructor_kwargs={"target": target, "ps": ps, "threads": threads},
        batch_size=res.batch_size,
        **_actor_args(res),
    )
    names = ["clipscore", *(normsim_name(p) for p in ps)]
    scores = {k: np.full(n, np.nan, dtype=np.float32) for k in names}
    result = ScoreResult(scores, None)
    progress = _Progress("CLIPScore/NormSim", n)
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in names:
            scores[k][b["idx"]] = b[k]
        for pid, loads in zip(b["actor"].tolist(), b["target_loads"].tolist(), strict=True):
            result.target_loads[pid] = max(result.target_loads.get(pid, 0), loads)
        progress.add(len(b["idx"]))
    result.seconds["score_clipscore_normsim"] = time.perf_counter() - t0
    if target is not None:
        log.info(
            "select: target loaded by %d actor(s), %s times each",
            len(result.target_loads),
            set(result.target_loads.values()),
        )
    nc = cfg.negclip
    if nc is not None:
        t0 = time.perf_counter()
        r, result.batches = _normalisers(pool, tau, nc, res)
        scores["negclip"] = (scores["clipscore"] - r).astype(np.float32)
        result.seconds["score_negclip"] = time.perf_counter() - t0
    missing = [k for k, v in scores.items() if np.isnan(v).any()]
    if missing:
        raise RuntimeError(f"scoring pass returned no value for some samples of {missing}")
    return result


def _normalisers(pool: PoolIndex, tau: float, nc: NegClipConfig, res: ScoreConfig) -> tuple[np.ndarray, Batches]:
    """R(i) of eq. 3, the mean over the K partitions, one actor call per (partition, window)."""
    n = len(pool)
    batches, windows = plan_windows(pool.sizes, nc.batch_size, nc.repeats, nc.seed, nc.window_batches)
    ks = batches.partitions
    log.info(
        "select: negCLIPLoss, K=%d partitions of |B|=%d (asked %d) in %d windows of >= %d rows",
        ks,
        batches.batch_size,
        nc.batch_size,
        len(windows),
        min(batches.window_rows, n),
    )
    items = [{"window": i} for i in range(len(windows))]
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        WindowActor,
        batch_size=1,
        fn_constructor_kwargs={
            "pool": pool,
            "windows": windows,
            "tau": tau,
            "batch_size": batches.batch_size,
            "seed": nc.seed,
            "threads": max(1, int(res.cpus_per_actor)),
        },
        **_actor_args(res),
    )
    r = np.zeros(n, dtype=np.float64)
    seen = np.zeros(n, dtype=np.int64)
    progress = _Progress("negCLIPLoss", n * ks)
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        np.add.at(r, b["idx"], b["norm"])
        np.add.at(seen, b["idx"], 1)
        progress.add(len(b["idx"]))
    if (seen != ks).any():
        raise RuntimeError(f"negCLIPLoss: {int((seen != ks).sum())} samples not scored once per partition")
    return r / ks, batches
