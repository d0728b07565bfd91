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
from dataclasses import dataclass

import numpy as np
import torch

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


def draw_batches(n: int, batch_size: int, repeat: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """The batches of partition `repeat`: a list of (indices, counted), where indices[:counted] are scored.

    A seeded permutation of 0..n-1 (numpy PCG64 seeded with (seed, repeat)) is cut into consecutive
    batches of exactly `batch_size`. When `batch_size` does not divide n, the last r = n mod |B|
    samples of the permutation form a ragged batch; it is filled up to |B| with |B| - r samples drawn
    without replacement from the rest of the pool, which take part in its log-sum-exps (so every
    scored sample gets a normaliser over exactly |B| samples) but whose scores from that batch are not
    counted: each sample is scored exactly once per partition. With batch_size >= n there is one batch,
    the whole pool, for every repeat.
    """
    if batch_size >= n:
        return [(np.arange(n), n)]
    rng = np.random.Generator(np.random.PCG64([seed, repeat]))
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


def neg_clip_loss(
    image: np.ndarray,
    text: np.ndarray,
    tau: float,
    batch_size: int,
    repeats: int,
    seed: int,
    device: torch.device | None = None,
) -> tuple[np.ndarray, Batches]:
    """negCLIPLoss(i) = CS(i) - R(i) (spec eq. 3), R the mean over K = `repeats` partitions of the pool.

    The partitions are those of `draw_batches` over the whole array (the pool), so R does not depend
    on how the pool is split into shards (this departs from the reference code, which draws batches
    inside each metadata shard, spec ambiguity 1; with shards smaller than |B| that would silently
    shrink |B|). Rows are gathered per batch, in pool order. Higher is better. Returns the scores
    and the batching actually used (|B| is capped at N, then deterministic).
    """
    if tau <= 0 or batch_size < 1 or repeats < 1:
        raise ValueError(f"needs tau > 0, batch_size >= 1, repeats >= 1; got {tau}, {batch_size}, {repeats}")
    device = device or torch.device("cpu")
    n = len(image)
    used = min(batch_size, n)
    r = np.zeros(n, dtype=np.float64)
    for k in range(repeats if used < n else 1):
        for idx, counted in draw_batches(n, used, k, seed):
            order = np.argsort(idx, kind="stable")  # pool order, as score_tasks gathers a batch
            rows = idx[order]
            v = torch.from_numpy(np.asarray(image[rows], dtype=np.float32)).to(device)
            t = torch.from_numpy(np.asarray(text[rows], dtype=np.float32)).to(device)
            norm = np.empty(len(idx), dtype=np.float64)
            norm[order] = normaliser(v, t, tau).double().cpu().numpy()
            r[idx[:counted]] += norm[:counted]
    r /= repeats if used < n else 1
    return (clip_score(image, text, device) - r).astype(np.float32), Batches(used, repeats, seed)


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
