"""Selection scores from a frozen teacher's unit-norm embeddings: CLIPScore, negCLIPLoss, NormSim_p.

Every function takes (N, d) array-likes (numpy arrays; NormSim's target also a tensor already on
`device`) and reads them in row chunks, so memory is bounded by the chunk and batch sizes, not by
N. The job runs them on Ray Data workers (score_tasks.py), a block or one batch at a time.
Arithmetic is float32 on `device` (a GPU when given one) whatever the stored dtype (float16 on
disk); log-sum-exp keeps tau = 0.01 from overflowing (exponents reach 1/tau = 100).

negCLIPLoss is called "negCLIPLoss" here; later versions of the paper call the same quantity
s-CLIPLoss (spec ambiguity 5), hence the alias `s_clip_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cliplab.select.config import WINDOW_BATCHES

CHUNK = 8192  # rows per matmul chunk for CLIPScore / NormSim


def _rows(x: np.ndarray | torch.Tensor, start: int, stop: int, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):  # already placed (a scoring actor's target on its device)
        return x[start:stop].to(device=device, dtype=torch.float32)
    return torch.from_numpy(np.ascontiguousarray(x[start:stop])).to(device=device, dtype=torch.float32)


def clip_score(image: np.ndarray, text: np.ndarray, device: torch.device | None = None) -> np.ndarray:
    """CS(i) = v_i^T l_i (spec eq. 1), float32 (N,)."""
    device = device or torch.device("cpu")
    out = np.empty(len(image), dtype=np.float32)
    for s in range(0, len(image), CHUNK):
        v, t = _rows(image, s, s + CHUNK, device), _rows(text, s, s + CHUNK, device)
        out[s : s + len(v)] = (v * t).sum(dim=1).cpu().numpy()
    return out


@dataclass(frozen=True)
class Batches:
    """How the K random partitions of one negCLIPLoss pass were drawn (recorded with the scores)."""

    batch_size: int  # the |B| used: min(requested |B|, N)
    repeats: int
    seed: int
    window_rows: int  # W: batches are drawn inside windows of at least W rows (the whole pool when N < 2W)
    pool_size: int

    @property
    def partitions(self) -> int:
        """K, or 1 when one batch holds the whole pool (every partition would be the same)."""
        return self.repeats if self.batch_size < self.pool_size else 1


def draw_windows(sizes: Sequence[int], window_rows: int, repeat: int, seed: int) -> list[list[int]]:
    """The shards (indices into `sizes`, rows per shard) of each window of partition `repeat`.

    A window is the unit of memory of the scoring pass: its rows are read together and cut into
    batches there, so no step needs more than a window's rows, whatever the pool size. With fewer
    than 2W rows in the pool there is one window, the whole pool. Otherwise the shards are put in a
    seeded random order (PCG64 seeded with (seed, repeat, 0)) and taken greedily until a window holds
    at least W rows; a last window short of W joins the one before. Each partition draws its own
    order, so the shards a sample meets change from one partition to the next, and windows mix
    shards from the whole pool (a pool concatenated from several sources is not scored per source).
    """
    if sum(sizes) < 2 * window_rows:
        return [list(range(len(sizes)))]
    order = np.random.Generator(np.random.PCG64([seed, repeat, 0])).permutation(len(sizes))
    windows: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for s in order.tolist():
        current.append(s)
        rows += sizes[s]
        if rows >= window_rows:
            windows.append(sorted(current))
            current, rows = [], 0
    if current:
        windows[-1] = sorted(windows[-1] + current)
    return windows


@dataclass(frozen=True)
class Window:
    """One window of one partition: its shards (rows: `window_rows_of`); `index` None when it is the whole pool."""

    repeat: int
    index: int | None
    shards: list[int]


def plan_windows(
    sizes: Sequence[int], batch_size: int, repeats: int, seed: int, window_batches: int
) -> tuple[Batches, list[Window]]:
    """The batching used (|B| capped at N, W = window_batches x |B|) and every window of every partition.

    With |B| >= N there is one partition of one batch, the whole pool: more would repeat it.
    """
    n = sum(sizes)
    used = min(batch_size, n)
    batches = Batches(used, repeats, seed, used * window_batches, n)
    windows = []
    for k in range(batches.partitions):
        drawn = draw_windows(sizes, batches.window_rows, k, seed)
        for j, shards in enumerate(drawn):
            windows.append(Window(k, None if len(drawn) == 1 else j, shards))
    return batches, windows


def window_rows_of(shards: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
    """The pool rows of a window made of `shards`, ascending (shards are consecutive row ranges of the pool)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    return np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shards]).astype(np.int64)


def draw_batches(
    n: int, batch_size: int, repeat: int, seed: int, window: int | None = None
) -> list[tuple[np.ndarray, int]]:
    """The batches of partition `repeat` over n rows: a list of (indices, counted), where indices[:counted] are scored.

    A seeded permutation of 0..n-1 (numpy PCG64 seeded with (seed, repeat) for a whole-pool draw,
    (seed, repeat, window + 1) for window `window` of a windowed one) is cut into consecutive
    batches of exactly `batch_size`. When `batch_size` does not divide n, the last r = n mod |B|
    samples of the permutation form a ragged batch; it is filled up to |B| with |B| - r samples drawn
    without replacement from the rest of the rows, which take part in its log-sum-exps (so every
    scored sample gets a normaliser over exactly |B| samples) but whose scores from that batch are not
    counted: each sample is scored exactly once per partition. With batch_size >= n there is one batch,
    all n rows, for every repeat.
    """
    if batch_size >= n:
        return [(np.arange(n), n)]
    key = [seed, repeat] if window is None else [seed, repeat, window + 1]
    rng = np.random.Generator(np.random.PCG64(key))
    perm = rng.permutation(n)
    full = n // batch_size * batch_size
    batches = [(perm[s : s + batch_size], batch_size) for s in range(0, full, batch_size)]
    rest = n - full
    if rest:
        fill = rng.choice(perm[:full], size=batch_size - rest, replace=False)
        batches.append((np.concatenate([perm[full:], fill]), rest))
    return batches


def normaliser(v: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    """(tau/2) [logsumexp_j v_i^T l_j / tau + logsumexp_j v_j^T l_i / tau] for every i of one batch (spec eq. 3)."""
    sim = (v @ t.T) / tau
    return 0.5 * tau * (torch.logsumexp(sim, dim=1) + torch.logsumexp(sim, dim=0))


def window_normalisers(
    image: np.ndarray,
    text: np.ndarray,
    tau: float,
    batch_size: int,
    repeat: int,
    seed: int,
    window: int | None,
    device: torch.device,
) -> np.ndarray:
    """R's term from partition `repeat` for every row of one window's (n, d) embeddings, float64 (n,).

    The window's rows are cut into batches by `draw_batches`; each batch is gathered in row order
    (so every implementation sums in the same order) and `normaliser` runs on it.
    """
    out = np.empty(len(image), dtype=np.float64)
    for idx, counted in draw_batches(len(image), batch_size, repeat, seed, window):
        order = np.argsort(idx, kind="stable")
        rows = idx[order]
        v = torch.from_numpy(np.asarray(image[rows], dtype=np.float32)).to(device)
        t = torch.from_numpy(np.asarray(text[rows], dtype=np.float32)).to(device)
        norm = np.empty(len(idx), dtype=np.float64)
        norm[order] = normaliser(v, t, tau).double().cpu().numpy()
        out[idx[:counted]] = norm[:counted]
    return out


def neg_clip_loss(
    image: np.ndarray,
    text: np.ndarray,
    tau: float,
    batch_size: int,
    repeats: int,
    seed: int,
    device: torch.device | None = None,
    sizes: Sequence[int] | None = None,
    window_batches: int = WINDOW_BATCHES,
) -> tuple[np.ndarray, Batches]:
    """negCLIPLoss(i) = CS(i) - R(i) (spec eq. 3), R the mean over K = `repeats` partitions of the pool.

    `sizes` are the pool's rows per shard (default: one shard). Each partition cuts the pool into
    windows of at least W = `window_batches` x |B| rows (`draw_windows`) and draws equal-size batches
    inside each window (`draw_batches`, ragged-batch filler rule included). A pool of fewer than 2W rows
    is one window, so small pools get batches drawn from the whole pool, independent of the shard split.
    This departs from the reference code, which draws batches inside each metadata shard (spec
    ambiguity 1; with shards smaller than |B| that silently shrinks |B|), and keeps memory bounded at
    scale without a global shuffle. Higher is better. Returns the scores and the batching actually used
    (|B| is capped at N, then deterministic).
    """
    if tau <= 0 or batch_size < 1 or repeats < 1 or window_batches < 1:
        raise ValueError(
            f"needs tau > 0, batch_size >= 1, repeats >= 1, window_batches >= 1; "
            f"got {tau}, {batch_size}, {repeats}, {window_batches}"
        )
    device = device or torch.device("cpu")
    n = len(image)
    sizes = list(sizes) if sizes is not None else [n]
    batches, windows = plan_windows(sizes, batch_size, repeats, seed, window_batches)
    r = np.zeros(n, dtype=np.float64)
    for w in windows:
        rows = window_rows_of(w.shards, sizes)
        r[rows] += window_normalisers(image[rows], text[rows], tau, batches.batch_size, w.repeat, seed, w.index, device)
    r /= batches.partitions
    return (clip_score(image, text, device) - r).astype(np.float32), batches


s_clip_loss = neg_clip_loss  # the later name of the same score (spec ambiguity 5)


def norm_sim(
    image: np.ndarray,
    target: np.ndarray | torch.Tensor,
    p: float,
    device: torch.device | None = None,
    chunk: int = CHUNK,
) -> np.ndarray:
    """NormSim_p(i) = ||G v_i||_p over the target image embeddings G (spec eq. 4), float32 (N,).

    p = inf is max_t g_t^T v_i (the main variant); finite p >= 1 is (sum_t |g_t^T v_i|^p)^(1/p), p = 2
    being sqrt(v_i^T G^T G v_i). Image embeddings only, as in the paper. The (chunk x chunk) similarity
    blocks bound memory for large target sets (ImageNet-1k train: 1.28M rows).
    """
    if not (p == math.inf or p >= 1):
        raise ValueError(f"NormSim needs p >= 1 or inf, got {p}")
    device = device or torch.device("cpu")
    out = np.empty(len(image), dtype=np.float32)
    for s in range(0, len(image), chunk):
        v = _rows(image, s, s + chunk, device)
        acc = torch.full((len(v),), -math.inf if p == math.inf else 0.0, device=device, dtype=torch.float64)
        for u in range(0, len(target), chunk):
            sim = (v @ _rows(target, u, u + chunk, device).T).double()
            if p == math.inf:
                acc = torch.maximum(acc, sim.max(dim=1).values)
            else:
                acc += sim.abs().pow(p).sum(dim=1)
        out[s : s + len(v)] = (acc if p == math.inf else acc.pow(1.0 / p)).float().cpu().numpy()
    return out


def teacher_tau(logit_scale: float | torch.Tensor) -> float:
    """The teacher's own temperature 1 / exp(logit_scale), the default tau (spec ambiguity 2)."""
    value = float(logit_scale.detach().float().reshape(-1)[0]) if isinstance(logit_scale, torch.Tensor) else logit_scale
    return 1.0 / math.exp(value)
