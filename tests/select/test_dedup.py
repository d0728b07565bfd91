"""Near-duplicate removal: the Ray Data step (k-means clusters, a group per cluster) against brute-force pairwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cliplab.select.config import DedupConfig, ScoreConfig
from cliplab.select.dedup import dedup_step, drop_near_duplicates, kmeans, rank_of
from cliplab.select.embed import write_output
from cliplab.select.pool import index_pool

DIM = 32
SIZES = (25, 0, 30, 20)  # rows per shard; the second has no output (unreadable)


def brute_force(image: np.ndarray, survivors: np.ndarray, score: np.ndarray, threshold: float) -> np.ndarray:
    """Survivors kept pairwise: none has an earlier-ranked survivor (score desc, index asc) at cosine >= threshold."""
    x = image.astype(np.float32)
    ranked = sorted(survivors.tolist(), key=lambda i: (-float(score[i]), i))
    kept = [i for r, i in enumerate(ranked) if all(float(x[i] @ x[j]) < threshold for j in ranked[:r])]
    return np.array(sorted(kept))


def planted_pool(rng: np.random.Generator, n: int) -> tuple[np.ndarray, int]:
    """n unit rows (float16): random directions, then copies of earlier rows with a little noise, one chain of three."""
    x = rng.normal(size=(n, DIM))
    for dst, src in [(5, 1), (40, 2), (41, 40), (70, 3), (60, 59), (33, 0)]:  # within and across shards; 2~40~41
        x[dst] = x[src] + rng.normal(scale=0.02, size=DIM) * np.linalg.norm(x[src])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16), 6


@pytest.fixture
def pool(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    image, planted = planted_pool(rng, sum(SIZES))
    out, urls, at = tmp_path / "pool", [], 0
    out.mkdir()
    for s, rows in enumerate(SIZES):
        url = f"s3://bucket/pool/{s:05d}.tar"
        urls.append(url)
        if not rows:
            continue
        part = {
            "uid": np.array([f"{s:016x}{i:016x}" for i in range(rows)], dtype=object),
            "key": np.array([f"{s:05d}{i:04d}" for i in range(rows)], dtype=object),
            "shard": np.array([url] * rows, dtype=object),
            "caption": np.array(["c"] * rows, dtype=object),
            "noisy": np.zeros(rows, dtype=np.int8),
            "image_emb": image[at : at + rows],
            "text_emb": image[at : at + rows],
        }
        write_output(str(out), url, [part], 0)
        at += rows
    return {"index": index_pool(str(out), urls, "pool"), "image": image, "planted": planted}


def test_cluster_rule_equals_brute_force_and_keeps_the_best_scored_copy() -> None:
    rng = np.random.default_rng(1)
    image, _ = planted_pool(rng, 75)
    score = rng.normal(size=75).astype(np.float32)
    survivors = np.arange(75)
    keep = drop_near_duplicates(image, rank_of(survivors, score, 75), 0.9)
    assert np.array_equal(np.flatnonzero(keep), brute_force(image, survivors, score, 0.9))
    score[5], score[1] = 10.0, -10.0  # the copy now outranks its original: the original goes
    keep = drop_near_duplicates(image, rank_of(survivors, score, 75), 0.9)
    assert keep[5] and not keep[1]


def test_kmeans_is_seeded_and_separates_clear_clusters() -> None:
    rng = np.random.default_rng(2)
    centres = np.eye(DIM)[:3]
    x = np.concatenate([c + rng.normal(scale=0.05, size=(40, DIM)) for c in centres])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a, b = kmeans(x, 3, 10, seed=7), kmeans(x, 3, 10, seed=7)
    assert np.array_equal(a, b)
    labels = (x @ a.T).argmax(axis=1)
    assert all(len(set(labels[i * 40 : (i + 1) * 40])) == 1 for i in range(3)) and len(set(labels)) == 3


def test_ray_step_equals_brute_force_pairwise(ray_local, pool) -> None:
    n = len(pool["index"])
    rng = np.random.default_rng(3)
    score = rng.normal(size=n).astype(np.float32)
    survivors = np.setdiff1d(np.arange(n), [7, 8, 50])  # a previous step dropped some samples
    cfg = DedupConfig(threshold=0.9, clusters=3, sample=40, iterations=5, seed=1)
    kept = dedup_step(pool["index"], survivors, score, cfg, ScoreConfig(cpus_per_actor=0.5, cpus_per_read=0.5))
    expected = brute_force(pool["image"], survivors, score, 0.9)
    assert len(survivors) - len(expected) == pool["planted"]  # every planted copy is one drop, no chance pair
    assert np.array_equal(kept, expected)
