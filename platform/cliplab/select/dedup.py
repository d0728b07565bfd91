"""Near-duplicate removal as a recipe step (SemDeDup style), out of core on Ray Data.

The step takes the survivors of the previous steps and drops a sample when an earlier-ranked sample
of its k-means cluster has cosine >= `threshold` with it (teacher image embeddings):

1. Centroids: a seeded sample of at most `sample` survivors is read by one Ray Data read task per
   shard output holding sampled rows; spherical k-means (`kmeans`, cosine, Lloyd iterations) runs in
   one Ray task on the sample's object refs. The sample never passes through the driver.
2. Assignment: a Ray Data map over the per-shard parquet outputs gives every survivor its nearest
   centroid; its pool index, rank and image embedding leave the map with it.
3. Per cluster: `groupby("cluster").map_groups` hands all rows of a cluster to one call, which orders
   them by rank and drops a row when any earlier row of the cluster is within the threshold
   (`drop_near_duplicates`, chunked so memory is a chunk times the cluster size). Only (pool index,
   keep) flags go back to the driver.

Choices (say so where they matter): the rank is the descending `rank_by` score, ties to the earlier
pool index, so the best-scored copy of a group survives (SemDeDup ranks by distance to the centroid
instead). As in SemDeDup, an earlier row counts even when it was dropped itself: in a chain a~b~c
with a and c apart, both b and c go. Duplicates that k-means puts in different clusters are not
compared (the approximation SemDeDup makes); with `clusters: 1` the step is the exact pairwise rule.
A cluster must fit one worker: pick `clusters` so that survivors / clusters rows fit its memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
import ray
import torch

from cliplab.select.config import DedupConfig, ScoreConfig
from cliplab.select.embed import actor_gpus
from cliplab.select.pool import PoolIndex, ShardPart, embedding_matrix, read_part

log = logging.getLogger("cliplab.select")
CHUNK = 2048  # rows per similarity chunk inside a cluster


def rank_of(survivors: np.ndarray, score: np.ndarray, n: int) -> np.ndarray:
    """Rank (0 = first) of each survivor by descending score, ties to the lower pool index; -1 elsewhere."""
    order = np.lexsort((survivors, -score[survivors].astype(np.float64)))
    rank = np.full(n, -1, dtype=np.int64)
    rank[survivors[order]] = np.arange(len(survivors))
    return rank


def drop_near_duplicates(image: np.ndarray, rank: np.ndarray, threshold: float) -> np.ndarray:
    """Keep flags (input order): False where an earlier-ranked row has cosine >= threshold (unit-norm rows)."""
    order = np.argsort(rank, kind="stable")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.from_numpy(np.ascontiguousarray(image[order])).to(device, torch.float32)
    drop = torch.zeros(len(x), dtype=torch.bool, device=device)
    for s in range(0, len(x), CHUNK):
        e = min(s + CHUNK, len(x))
        sims = x[s:e] @ x[:e].T
        earlier = torch.arange(e, device=device)[None, :] < torch.arange(s, e, device=device)[:, None]
        drop[s:e] = (sims.masked_fill(~earlier, -2.0) >= threshold).any(dim=1)
    keep = np.empty(len(x), dtype=bool)
    keep[order] = ~drop.cpu().numpy()
    return keep


def kmeans(x: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (k, d) of unit-norm rows, seeded; an emptied cluster restarts at a random row."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.ascontiguousarray(x)).float()
    k = min(k, len(data))
    centroids = data[torch.randperm(len(data), generator=gen)[:k]].clone()
    for _ in range(iterations):
        assign = (data @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        sums[empty] = data[torch.randint(len(data), (int(empty.sum()),), generator=gen)]
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids.numpy()


@ray.remote
def _fit(sample_refs: list[ray.ObjectRef], k: int, iterations: int, seed: int) -> np.ndarray:
    torch.set_num_threads(1)
    x = np.concatenate([b["image"] for b in ray.get(sample_refs)])
    return kmeans(x, k, iterations, seed)


def _read_rows(batch: dict[str, np.ndarray], out: str, rank_ref: list) -> dict[str, np.ndarray]:
    """Ray Data UDF: the survivors of one shard output (rank >= 0) with pool index, rank and image embedding."""
    rank = ray.get(rank_ref[0])
    (part,) = map(ShardPart, *(batch[k].tolist() for k in ("url", "path", "offset", "rows")))
    r = rank[part.offset : part.offset + part.rows]
    mine = np.flatnonzero(r >= 0)
    image = embedding_matrix(read_part(out, part, ["image_emb"]).column("image_emb"))[mine]
    return {"idx": mine + part.offset, "rank": r[mine], "image": image}


def _assign(batch: dict[str, np.ndarray], centroids: np.ndarray) -> dict[str, np.ndarray]:
    image = torch.from_numpy(np.array(batch["image"], dtype=np.float32))  # a copy: Ray's blocks are read-only
    return {**batch, "cluster": (image @ torch.from_numpy(centroids).T).argmax(dim=1).numpy()}


def _dedup_group(batch: dict[str, np.ndarray], threshold: float) -> dict[str, np.ndarray]:
    return {"idx": batch["idx"], "keep": drop_near_duplicates(batch["image"], batch["rank"], threshold)}


def dedup_step(
    pool: PoolIndex, survivors: np.ndarray, score: np.ndarray, cfg: DedupConfig, res: ScoreConfig
) -> np.ndarray:
    """The survivors (sorted pool indices) this step keeps; see the module docstring for the rule."""
    n, t0 = len(pool), time.perf_counter()
    if len(survivors) < 2:
        return survivors
    sampled, sample_refs = _sample(pool, survivors, cfg, res)
    fit = _fit.options(num_cpus=res.cpus_per_actor).remote(sample_refs, cfg.clusters, cfg.iterations, cfg.seed)
    centroids = ray.get(fit)
    log.info("select: dedup, %d survivors, %d clusters fitted on %d rows", len(survivors), len(centroids), sampled)
    groups = (
        _rows(pool, rank_of(survivors, score, n), [asdict(p) for p in pool.parts], res)
        .map_batches(_assign, batch_size=None, fn_kwargs={"centroids": centroids})
        .groupby("cluster", num_partitions=min(len(centroids), len(pool.parts)))
        .map_groups(
            _dedup_group,
            batch_format="numpy",
            fn_kwargs={"threshold": cfg.threshold},
            num_cpus=res.cpus_per_actor,
            num_gpus=actor_gpus(res) or None,
        )
    )
    keep = np.zeros(n, dtype=bool)
    seen = 0
    for b in groups.iter_batches(batch_size=None, batch_format="numpy"):
        keep[b["idx"][b["keep"]]] = True
        seen += len(b["idx"])
    if seen != len(survivors):
        raise RuntimeError(f"dedup: {seen} flags came back for {len(survivors)} survivors")
    kept = np.flatnonzero(keep)
    log.info(
        "select: dedup dropped %d near-duplicates (cosine >= %g), %d kept, %.1fs",
        len(survivors) - len(kept),
        cfg.threshold,
        len(kept),
        time.perf_counter() - t0,
    )
    return kept


def _rows(pool: PoolIndex, rank: np.ndarray, parts: list[dict], res: ScoreConfig) -> ray.data.Dataset:
    """Rows with rank >= 0 of the shard outputs `parts`: one read task per shard output."""
    ds = ray.data.from_items(parts, override_num_blocks=len(parts))
    fn_kwargs = {"out": pool.out, "rank_ref": [ray.put(rank)]}  # in a list: Ray passes the ref, not the array
    return ds.map_batches(_read_rows, batch_size=1, num_cpus=res.cpus_per_read, fn_kwargs=fn_kwargs)


def _sample(
    pool: PoolIndex, survivors: np.ndarray, cfg: DedupConfig, res: ScoreConfig
) -> tuple[int, list[ray.ObjectRef]]:
    """A seeded sample of at most `cfg.sample` survivors, read from the shard outputs holding them, as object refs."""
    picked = np.random.default_rng(cfg.seed).choice(survivors, size=min(cfg.sample, len(survivors)), replace=False)
    rank = np.full(len(pool), -1, dtype=np.int64)
    rank[picked] = 0
    parts = [asdict(p) for p in pool.parts if (rank[p.offset : p.offset + p.rows] >= 0).any()]
    return len(picked), _rows(pool, rank, parts, res).to_numpy_refs()
