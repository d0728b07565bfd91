"""Selection scoring throughput and peak memory at growing pool sizes, as ratios against the first size.

Each pool size is scored in a fresh process (one scoring worker, as the selection job's driver is) on a pool
of random unit embeddings, which the parent writes as float16 `.npy` memmaps as `cliplab.select.pool.load_pool`
leaves them: CLIPScore, negCLIPLoss (K partitions into batches of |B|) and NormSim_inf against a target set.
Printed per size and stage: samples/s (best of `--trials` runs) and its ratio to the first size (1.0 = linear
scaling), and the worker's peak RSS (memmap pages it touched included) with its ratio. Memory bounded by |B|
and the chunk size, not by N, shows as a peak ratio well below the size ratio.

    .venv/bin/python benchmarks/selection.py [--sizes 10000 40000 160000] [--dim 512] [--batch 4096] [--trials 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _unit_memmap(path: Path, n: int, dim: int, seed: int) -> None:
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


def _child(args: tuple, queue: mp.Queue) -> None:
    queue.put(score_one_size(*args))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000, 160000])
    p.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B/32: 512, ViT-L/14: 768)")
    p.add_argument("--batch", type=int, default=4096, help="negCLIPLoss |B|")
    p.add_argument("--repeats", type=int, default=2, help="negCLIPLoss K")
    p.add_argument("--target", type=int, default=1000, help="NormSim target set size")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the scoring worker")
    p.add_argument("--trials", type=int, default=3, help="timed runs per stage; the fastest counts")
    args = p.parse_args()
    ctx = mp.get_context("spawn")  # a fresh process per size: its peak RSS is that size's alone
    results = {}
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="cliplab-bench-select-") as tmp:
            for name, rows, seed in (("image", n, 0), ("text", n, 1), ("target", args.target, 2)):
                _unit_memmap(Path(tmp) / f"{name}.npy", rows, args.dim, seed)
            queue = ctx.Queue()
            proc = ctx.Process(target=_child, args=((tmp, args.batch, args.repeats, args.threads, args.trials), queue))
            proc.start()
            results[n] = queue.get()
            proc.join()
        print(f"size {n}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[n].items()), flush=True)
    first = args.sizes[0]
    print(
        f"\nscoring, one worker ({args.threads} threads), d={args.dim}, |B|={args.batch}, K={args.repeats}, "
        f"{args.target} target rows, best of {args.trials}; ratios against {first} samples"
    )
    print(f"{'pool':>8}  {'stage':<12}{'samples/s':>11}{'ratio':>7}{'worker peak RSS MiB':>21}{'ratio':>7}")
    for n in args.sizes:
        r, base = results[n], results[first]
        for stage in ("clipscore", "negclip", "normsim_inf"):
            rate, base_rate = n / r[f"{stage}_s"], first / base[f"{stage}_s"]
            print(
                f"{n:>8}  {stage:<12}{rate:>11.0f}{rate / base_rate:>7.2f}"
                f"{r['peak_rss_mib']:>21.0f}{r['peak_rss_mib'] / base['peak_rss_mib']:>7.2f}"
            )


if __name__ == "__main__":
    main()
