"""The scoring pass on Ray Data: every score of the pool out of core, only per-sample scalars back to the driver.

The pool is never assembled anywhere: `from_items(parts, override_num_blocks=len(parts))` gives one read
task per complete shard output (pool.py), which numbers its rows with their global pool index (the
shard's offset plus the row's position in the file: the order the negCLIPLoss partitions index).

- CLIPScore (spec eq. 1) and NormSim_p (eq. 4) run in a fixed actor pool (`ActorPoolStrategy`, one GPU
  per actor when `score.gpus_per_actor` > 0): each actor reads the target image embeddings from the
  target's parquet outputs once, in its constructor, and keeps them on its device (the target is
  replicated once per actor, never sent through the driver); `scores.clip_score` and
  `scores.norm_sim` (chunked matmul) do the math.
- negCLIPLoss (eq. 3): the driver draws the K partitions with `scores.draw_batches` (the seeded
  permutations and ragged-batch filler rule of `scores.neg_clip_loss`) and puts one batch id per row
  and repeat in the object store. A map stage emits each row once per repeat under the key
  (repeat, batch), the ragged batch's filler rows a second time marked not counted; `groupby(key)`
  regroups them (a hash shuffle), and `map_groups` runs `scores.normaliser` on each whole batch and
  returns only (row, R term) pairs of the counted rows, which the driver averages per row.

Everything that reaches the driver is a row index with float scores; the shuffle moves K copies of
the pool's embeddings (plus |B| - r filler rows per repeat when |B| does not divide n) between workers.
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

from cliplab.select.config import ScoreConfig, ScoresConfig, normsim_name
from cliplab.select.pool import PoolIndex, ShardPart, embedding_matrix, read_part
from cliplab.select.scores import Batches, clip_score, draw_batches, norm_sim, normaliser

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
        table = read_part(out, part, ["image_emb", "text_emb"])
        image, text = embedding_matrix(table.column("image_emb")), embedding_matrix(table.column("text_emb"))
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


@dataclass(frozen=True)
class Plan:
    """The K partitions: batch id per (repeat, row), each ragged batch's filler rows, batches per repeat."""

    batch: np.ndarray  # (K, n) int32
    fillers: list[np.ndarray]
    per_repeat: int


def plan_partitions(n: int, batch_size: int, repeats: int, seed: int) -> Plan:
    """`draw_batches` for every repeat as one batch id per row; a single repeat when |B| >= n (deterministic)."""
    ks = repeats if batch_size < n else 1
    batch = np.empty((ks, n), dtype=np.int32)
    fillers, per_repeat = [], 0
    for k in range(ks):
        drawn = draw_batches(n, batch_size, k, seed)
        per_repeat = len(drawn)
        for b, (idx, counted) in enumerate(drawn):
            batch[k, idx[:counted]] = b
        fillers.append(np.sort(drawn[-1][0][drawn[-1][1] :]))
    return Plan(batch, fillers, per_repeat)


def to_batches(batch: dict[str, np.ndarray], plan: ray.ObjectRef) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map UDF: each row once per repeat, keyed (repeat, batch); ragged-batch fillers again, uncounted."""
    p: Plan = ray.get(plan)
    idx = batch["idx"]
    for k in range(len(p.batch)):
        base = k * p.per_repeat
        fill = np.isin(idx, p.fillers[k])
        yield {
            "group": np.concatenate([base + p.batch[k, idx], np.full(int(fill.sum()), base + p.per_repeat - 1)]),
            "idx": np.concatenate([idx, idx[fill]]),
            "counted": np.concatenate([np.ones(len(idx), bool), np.zeros(int(fill.sum()), bool)]),
            "image": np.concatenate([batch["image"], batch["image"][fill]]),
            "text": np.concatenate([batch["text"], batch["text"][fill]]),
        }


class NormaliserActor:
    """Ray Data group UDF: the R term of eq. 3 for every counted row of one whole batch."""

    def __init__(self, tau: float, size: int, threads: int):
        torch.set_num_threads(threads)
        self.device, self.tau, self.size = _device(), tau, size

    @torch.no_grad()
    def __call__(self, group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        order = np.argsort(group["idx"], kind="stable")  # pool order, as neg_clip_loss gathers a batch
        if len(order) != self.size:
            raise RuntimeError(f"negCLIPLoss batch {group['group'][0]} has {len(order)} rows, expected {self.size}")
        v = torch.from_numpy(np.asarray(group["image"][order], np.float32)).to(self.device)
        t = torch.from_numpy(np.asarray(group["text"][order], np.float32)).to(self.device)
        norm = normaliser(v, t, self.tau).double().cpu().numpy()
        keep = group["counted"][order]
        return {"idx": group["idx"][order][keep], "norm": norm[keep]}


def _rows_dataset(pool: PoolIndex, res: ScoreConfig) -> ray.data.Dataset:
    items = [asdict(p) for p in pool.parts]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    threads = max(1, int(res.cpus_per_read))
    return ds.map_batches(
        read_rows, batch_size=1, num_cpus=res.cpus_per_read, fn_kwargs={"out": pool.out, "threads": threads}
    )


def _actor_args(res: ScoreConfig) -> dict[str, Any]:
    gpus = gpus_per_actor(res)
    args: dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(size=res.actors), "num_cpus": res.cpus_per_actor}
    if gpus:
        args["num_gpus"] = gpus
    if res.memory_per_actor_gb:
        args["memory"] = res.memory_per_actor_gb * 2**30
    return args


def gpus_per_actor(res: ScoreConfig) -> float:
    """`score.gpus_per_actor`, or when unset 1 if the Ray cluster has a GPU, else 0 (CPU actors)."""
    if res.gpus_per_actor is not None:
        return res.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


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
        gpus_per_actor(res),
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
        r, result.batches = _normalisers(pool, tau, nc.batch_size, nc.repeats, nc.seed, res)
        scores["negclip"] = (scores["clipscore"] - r).astype(np.float32)
        result.seconds["score_negclip"] = time.perf_counter() - t0
    missing = [k for k, v in scores.items() if np.isnan(v).any()]
    if missing:
        raise RuntimeError(f"scoring pass returned no value for some samples of {missing}")
    return result


def _normalisers(
    pool: PoolIndex, tau: float, batch_size: int, repeats: int, seed: int, res: ScoreConfig
) -> tuple[np.ndarray, Batches]:
    """R(i) of eq. 3, the mean over the K partitions, from a groupby over (repeat, batch) on Ray Data."""
    if tau <= 0 or batch_size < 1 or repeats < 1:
        raise ValueError(f"needs tau > 0, batch_size >= 1, repeats >= 1; got {tau}, {batch_size}, {repeats}")
    n = len(pool)
    used = min(batch_size, n)
    plan = plan_partitions(n, used, repeats, seed)
    groups = len(plan.batch) * plan.per_repeat
    log.info(
        "select: negCLIPLoss, K=%d partitions of %d batches of |B|=%d (asked %d): %d rows regrouped",
        len(plan.batch),
        plan.per_repeat,
        used,
        batch_size,
        groups * used,
    )
    ds = (
        _rows_dataset(pool, res)
        .map_batches(to_batches, batch_size=None, num_cpus=res.cpus_per_read, fn_kwargs={"plan": ray.put(plan)})
        .groupby("group", num_partitions=groups)
        .map_groups(
            NormaliserActor,
            batch_format="numpy",
            fn_constructor_kwargs={"tau": tau, "size": used, "threads": max(1, int(res.cpus_per_actor))},
            **_actor_args(res),
        )
    )
    r = np.zeros(n, dtype=np.float64)
    seen = np.zeros(n, dtype=np.int64)
    progress = _Progress("negCLIPLoss", n * len(plan.batch))
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        np.add.at(r, b["idx"], b["norm"])
        np.add.at(seen, b["idx"], 1)
        progress.add(len(b["idx"]))
    if (seen != len(plan.batch)).any():
        raise RuntimeError(f"negCLIPLoss: {int((seen != len(plan.batch)).sum())} samples not scored once per partition")
    return r / len(plan.batch), Batches(used, repeats, seed)
