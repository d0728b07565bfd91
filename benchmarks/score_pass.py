"""Selection scoring on one pool of random unit embeddings, measured: best seconds per score and peak RSS.

The pool is written as float16 `.npy` memmaps, as `cliplab.select.pool.load_pool` leaves them, and scored in a
fresh process per size (one scoring worker, as the selection job's driver is): CLIPScore, negCLIPLoss (K
partitions into batches of |B|) and NormSim_inf against a target set. The peak RSS counts the memmap pages the
worker touched.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def unit_memmap(path: Path, n: int, dim: int, seed: int) -> None:
    """n random unit vectors as a float16 memmap, written in chunks (the pool never sits in memory whole)."""
    out = np.lib.format.open_memmap(path, "w+", np.float16, (n, dim))
    rng = np.random.default_rng(seed)
    for s in range(0, n, 65536):
        x = rng.standard_normal((min(65536, n - s), dim), dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()


def _best_of(trials: int, fn: Callable[[], object]) -> float:
    """The fastest of `trials` timed calls (the machine may be shared: the minimum is the least disturbed)."""
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def score_one_size(folder: str, batch: int, repeats: int, threads: int, trials: int) -> dict[str, float]:
    """Score the pool memmapped in `folder` in this process: best seconds per stage and peak RSS in MiB."""
    import torch

    from cliplab.select.scores import clip_score, neg_clip_loss, norm_sim

    torch.set_num_threads(threads)
    # r+ as load_pool's memmaps are writable; nothing is written
    image, text, tgt = (np.load(Path(folder) / f"{k}.npy", mmap_mode="r+") for k in ("image", "text", "target"))
    neg_clip_loss(image[:256], text[:256], 0.01, 128, 1, 0)  # warm-up: torch's thread pool and kernels
    out: dict[str, float] = {"rss_before_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out["clipscore_s"] = _best_of(trials, lambda: clip_score(image, text))
    out["negclip_s"] = _best_of(trials, lambda: neg_clip_loss(image, text, 0.01, batch, repeats, 0))
    out["normsim_inf_s"] = _best_of(trials, lambda: norm_sim(image, tgt, float("inf")))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out
