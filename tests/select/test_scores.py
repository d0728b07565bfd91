"""Every score against a direct dense computation on small pools."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cliplab.select.scores import (
    clip_score,
    draw_batches,
    draw_windows,
    neg_clip_loss,
    norm_sim,
    teacher_tau,
    window_rows_of,
)


def unit(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def dense_r(v: np.ndarray, t: np.ndarray, tau: float) -> np.ndarray:
    """R(i) of spec eq. 3 over one batch, computed the textbook way in float64."""
    s = v.astype(np.float64) @ t.astype(np.float64).T / tau
    lse_rows = np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)
    lse_cols = np.log(np.exp(s - s.max(0, keepdims=True)).sum(0)) + s.max(0)
    return 0.5 * tau * (lse_rows + lse_cols)


@pytest.fixture
def pool() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return unit(rng, 37), unit(rng, 37)


def test_clip_score_is_the_pair_cosine(pool) -> None:
    v, t = pool
    np.testing.assert_allclose(clip_score(v, t), (v * t).sum(1), rtol=0, atol=1e-6)


def test_neg_clip_loss_with_the_whole_pool_as_batch_is_the_dense_formula(pool) -> None:
    v, t = pool
    tau = 0.01  # exp(1/tau) overflows float32: log-sum-exp must be used
    score, used = neg_clip_loss(v, t, tau, batch_size=1000, repeats=5, seed=1)
    dense = (v * t).sum(1) - dense_r(v, t, tau)
    np.testing.assert_allclose(score, dense, atol=1e-5)
    assert used.batch_size == 37
    again, _ = neg_clip_loss(v, t, tau, batch_size=37, repeats=3, seed=99)
    np.testing.assert_allclose(again, score, atol=1e-6)  # deterministic: no randomness left


def test_partitions_are_equal_size_and_score_everyone_once() -> None:
    for repeat in range(3):
        batches = draw_batches(37, 8, repeat, seed=4)
        assert all(len(idx) == 8 and len(set(idx.tolist())) == 8 for idx, _ in batches)
        scored = np.concatenate([idx[:counted] for idx, counted in batches])
        assert sorted(scored.tolist()) == list(range(37))
    assert not np.array_equal(draw_batches(37, 8, 0, 4)[0][0], draw_batches(37, 8, 1, 4)[0][0])
    assert np.array_equal(draw_batches(37, 8, 2, 4)[-1][0], draw_batches(37, 8, 2, 4)[-1][0])


def test_neg_clip_loss_is_the_formula_over_the_drawn_batches(pool) -> None:
    v, t = pool
    tau, bsz, k, seed = 0.05, 8, 4, 7
    score, used = neg_clip_loss(v, t, tau, batch_size=bsz, repeats=k, seed=seed)
    r = np.zeros(len(v))
    for repeat in range(k):
        for idx, counted in draw_batches(len(v), bsz, repeat, seed):
            r[idx[:counted]] += dense_r(v[idx], t[idx], tau)[:counted]
    np.testing.assert_allclose(score, (v * t).sum(1) - r / k, atol=1e-5)
    assert (used.batch_size, used.repeats, used.seed) == (8, 4, 7)


SIZES = [6, 0, 9, 5, 7, 10]  # rows per shard of the 37-row pool; one shard is empty


def test_windows_hold_whole_shards_once_and_at_least_w_rows() -> None:
    for repeat in range(4):
        windows = draw_windows(SIZES, 8, repeat, seed=3)
        assert sorted(s for w in windows for s in w) == list(range(len(SIZES)))
        assert len(windows) > 1 and all(sum(SIZES[s] for s in w) >= 8 for w in windows)
        rows = np.concatenate([window_rows_of(w, SIZES) for w in windows])
        assert sorted(rows.tolist()) == list(range(37))
    assert len({str(draw_windows(SIZES, 8, k, 3)) for k in range(4)}) > 1  # each partition its own windows
    assert draw_windows(SIZES, 19, 0, 3) == [list(range(len(SIZES)))]  # 37 < 2 W: the whole pool


def test_windowed_neg_clip_loss_is_the_formula_over_each_windows_batches(pool) -> None:
    v, t = pool
    tau, bsz, k, seed = 0.05, 4, 3, 2
    score, used = neg_clip_loss(v, t, tau, batch_size=bsz, repeats=k, seed=seed, sizes=SIZES, window_batches=2)
    r = np.zeros(len(v))
    for repeat in range(k):
        for j, shards in enumerate(draw_windows(SIZES, 8, repeat, seed)):
            rows = window_rows_of(shards, SIZES)
            for idx, counted in draw_batches(len(rows), bsz, repeat, seed, j):
                r[rows[idx[:counted]]] += dense_r(v[rows[idx]], t[rows[idx]], tau)[:counted]
    np.testing.assert_allclose(score, (v * t).sum(1) - r / k, atol=1e-5)
    assert used.window_rows == 8
    whole, _ = neg_clip_loss(v, t, tau, batch_size=bsz, repeats=k, seed=seed)
    assert np.abs(whole - score).max() > 1e-4  # windows change which rows share a batch


def test_neg_clip_loss_reads_a_float16_memmap(tmp_path, pool) -> None:
    v, t = pool
    mv = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.float16, shape=v.shape)
    mt = np.lib.format.open_memmap(tmp_path / "t.npy", mode="w+", dtype=np.float16, shape=t.shape)
    mv[:], mt[:] = v, t
    got, _ = neg_clip_loss(mv, mt, 0.07, batch_size=10, repeats=2, seed=0)
    want, _ = neg_clip_loss(mv[:].astype(np.float32), mt[:].astype(np.float32), 0.07, 10, 2, 0)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("p", [math.inf, 2.0, 3.0])
def test_norm_sim_is_the_p_norm_of_target_similarities(pool, p: float) -> None:
    v, _ = pool
    g = unit(np.random.default_rng(1), 23)
    sims = v.astype(np.float64) @ g.astype(np.float64).T
    want = sims.max(1) if p == math.inf else (np.abs(sims) ** p).sum(1) ** (1 / p)
    np.testing.assert_allclose(norm_sim(v, g, p, chunk=5), want, atol=1e-6)


def test_bad_parameters_are_refused(pool) -> None:
    v, t = pool
    with pytest.raises(ValueError, match="tau"):
        neg_clip_loss(v, t, 0.0, 8, 1, 0)
    with pytest.raises(ValueError, match="p >= 1"):
        norm_sim(v, v, 0.5)


def test_default_tau_is_the_teachers_temperature() -> None:
    assert teacher_tau(torch.tensor([math.log(100.0)])) == pytest.approx(0.01)
    assert teacher_tau(math.log(1 / 0.07)) == pytest.approx(0.07)
