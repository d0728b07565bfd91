"""The Ray Data scoring pass equals the in-process scores on the same embedded pool; the target loads once per actor."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cliplab.select.config import NegClipConfig, ScoreConfig, ScoresConfig
from cliplab.select.embed import output_paths, write_output
from cliplab.select.pool import index_pool, read_meta
from cliplab.select.score_tasks import score_pool
from cliplab.select.scores import clip_score, draw_windows, neg_clip_loss, norm_sim

SIZES = (13, 0, 11, 9)  # rows per shard; the second shard has no output (unreadable) and is left out
DIM = 8


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_embedded(out: Path, name: str, sizes: tuple[int, ...], seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Shard outputs as the embedding pass writes them; the pool's image and text embeddings in pool order."""
    rng = np.random.default_rng(seed)
    out.mkdir()
    urls, images, texts = [], [], []
    for s, rows in enumerate(sizes):
        url = f"s3://bucket/{name}/{s:05d}.tar"
        urls.append(url)
        if not rows:
            continue
        image, text = unit(rng, rows), unit(rng, rows)
        keys = np.array([f"{s:05d}{i:04d}" for i in range(rows)], dtype=object)
        part = {
            "uid": np.array([f"{s:016x}{i:016x}" for i in range(rows)], dtype=object),
            "key": keys,
            "shard": np.array([url] * rows, dtype=object),
            "caption": np.array(["c"] * rows, dtype=object),
            "noisy": np.zeros(rows, dtype=np.int8),
            "image_emb": image,
            "text_emb": text,
        }
        write_output(str(out), url, [part], 0)
        images.append(image)
        texts.append(text)
    return urls, np.concatenate(images), np.concatenate(texts)


@pytest.fixture
def embedded(tmp_path: Path) -> dict:
    urls, image, text = write_embedded(tmp_path / "pool", "pool", SIZES, 0)
    turls, target, _ = write_embedded(tmp_path / "target", "target", (7, 6), 1)
    return {
        "pool": index_pool(str(tmp_path / "pool"), urls, "pool"),
        "target": index_pool(str(tmp_path / "target"), turls, "target"),
        "image": image,
        "text": text,
        "target_image": target,
    }


def test_index_offsets_and_meta_follow_pool_order(embedded) -> None:
    pool = embedded["pool"]
    assert [(p.offset, p.rows) for p in pool.parts] == [(0, 13), (13, 11), (24, 9)] and len(pool) == 33
    meta = read_meta(pool)
    assert meta.column_names == ["uid", "key", "shard", "noisy"] and len(meta) == 33
    assert meta.column("key").to_pylist()[13] == "000020000"  # shard 2's first row follows shard 0


@pytest.mark.slow
@pytest.mark.parametrize(  # ragged |B| < n in windows of one shard each (W = 8); |B| >= n: one batch, one window
    "batch_size, repeats, actors, window_batches", [(8, 3, 2, 1), (64, 2, 1, 8)]
)
def test_ray_scores_equal_the_in_process_scores(ray_local, embedded, batch_size, repeats, actors, window_batches):
    image, text, target = embedded["image"], embedded["text"], embedded["target_image"]
    cfg = ScoresConfig(
        tau=0.01,
        negclip=NegClipConfig(batch_size=batch_size, repeats=repeats, seed=4, window_batches=window_batches),
        normsim_p=[2, "inf"],
    )
    res = ScoreConfig(actors=actors, cpus_per_actor=0.5, cpus_per_read=0.5, batch_size=5, gpus_per_actor=0)
    out = score_pool(embedded["pool"], embedded["target"], cfg, 0.01, res)

    assert set(out.scores) == {"clipscore", "negclip", "normsim_2", "normsim_inf"}
    tol = {"rtol": 0, "atol": 1e-6}
    np.testing.assert_allclose(out.scores["clipscore"], clip_score(image, text), **tol)
    np.testing.assert_allclose(out.scores["normsim_2"], norm_sim(image, target, 2.0), **tol)
    np.testing.assert_allclose(out.scores["normsim_inf"], norm_sim(image, target, math.inf), **tol)
    sizes = embedded["pool"].sizes
    expected, batches = neg_clip_loss(
        image, text, 0.01, batch_size, repeats, 4, sizes=sizes, window_batches=window_batches
    )
    np.testing.assert_allclose(out.scores["negclip"], expected, rtol=0, atol=1e-5)
    assert out.batches == batches and batches.batch_size == min(batch_size, 33)
    assert len(draw_windows(sizes, batches.window_rows, 0, 4)) == (3 if window_batches == 1 else 1)
    # 33 rows in calls of 5 rows: more calls than actors, yet each actor loaded the target exactly once
    assert 1 <= len(out.target_loads) <= actors and set(out.target_loads.values()) == {1}


@pytest.mark.slow
def test_a_marker_disagreeing_with_its_file_is_refused(ray_local, embedded) -> None:
    pool = embedded["pool"]
    marker = Path(output_paths(pool.out, pool.parts[0].url)[1])
    marker.write_text(marker.read_text().replace('"rows": 13', '"rows": 14'))
    again = index_pool(pool.out, [p.url for p in pool.parts], "pool")
    with pytest.raises(Exception, match="marker says 14"):
        score_pool(
            again, None, ScoresConfig(tau=0.01, negclip=None), 0.01, ScoreConfig(cpus_per_actor=0.5, cpus_per_read=0.5)
        )
