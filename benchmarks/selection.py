"""Selection throughput and peak memory at growing pool sizes, as ratios against the first size.

Two stages of `cliplab select`, each size in a fresh process so that no peak carries over:

- embed: the Ray Data embedding pass (`cliplab.select.embed.embed_shards`, what the job's stage 2 runs) over a
  SynthScenes pool written to local disk (1000 samples per shard, 32 px), with a tiny random-weight ViT teacher,
  on a new local Ray of `--cpus` CPUs. Samples/s is the pass's embedded samples over its wall time, Ray Data's
  and the actors' start-up included, as the job's `speed/embed_pool_samples_per_s` (writing the pool is not
  timed). Peak RSS: each Ray worker's kernel high-water mark (VmHWM, worker_peaks.py) and the driver's ru_maxrss.
  By default read tasks ask for 0.5 CPU and the actor for 1, so Ray Data does not fuse them and reading,
  decoding and embedding each show up in their own workers.
- score: the Ray Data scoring pass (`cliplab.select.score_tasks.score_pool`, the job's stage 3, score_pass.py) on
  random unit embeddings written as the embedding pass's per-shard parquet outputs, on a new local Ray of
  `--cpus` CPUs: CLIPScore + NormSim_inf in `--actors` scoring actors, then negCLIPLoss (K partitions, each
  scored one window of shards at a time by window actors; windows of `--window-batches` x |B| rows, so the
  larger pools are scored in several windows). Samples/s per pass over its wall time (Ray Data's start-up
  included); peak RSS per worker role (actor: the scoring and window actors; read: the read tasks) and the
  driver's.

Ratios: samples/s against the first size (1.0 = linear scaling), and peak RSS against the first size next to
the size ratio; memory bounded by shard, chunk and batch sizes rather than by N shows as a peak ratio near 1
while the size ratio grows.

    .venv/bin/python benchmarks/selection.py [--stage embed|score|all] [--sizes 10000 40000 160000] [--json PATH]
    .venv/bin/python benchmarks/selection.py --smoke --json smoke.json     # 200 and 400 samples, a minute
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from embed_inputs import write_pool, write_teacher
from embed_pass import embed_one_size
from score_pass import score_one_size, write_embedded

SMOKE_SIZES = [200, 400]
PASSES = ("score_clipscore_normsim", "score_negclip")


def _child(fn: Any, args: tuple, queue: mp.Queue) -> None:
    queue.put(fn(*args))


def _in_fresh_process(fn: Any, *args: Any) -> dict[str, Any]:
    """`fn(*args)` in a new spawned interpreter: its peak RSS and its Ray instance are its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def embed_sizes(args: argparse.Namespace) -> dict[str, Any]:
    """Embed a fresh SynthScenes pool of each size; per size the pass's counts, samples/s and peaks."""
    embed = {"actors": 1, "cpus_per_actor": 1.0, "cpus_per_read": args.cpus_per_read, "batch_size": args.embed_batch}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cliplab-bench-embed-") as tmp:
        teacher = write_teacher(Path(tmp) / "teacher")
        for n in args.sizes:
            pool = Path(tmp) / f"pool-{n}"
            urls = write_pool(pool, n, args.per_shard, args.image_size)
            r = _in_fresh_process(embed_one_size, urls, teacher, str(Path(tmp) / f"out-{n}"), embed, args.cpus)
            results[str(n)] = r
            print(
                f"size {n}: {r['embedded']} embedded in {r['seconds']:.1f}s, {r['samples_per_s']:.0f} samples/s, "
                f"worker peaks MiB {', '.join(f'{k} {v:.0f}' for k, v in sorted(r['role_peak_rss_mib'].items()))}, "
                f"driver {r['driver_peak_rss_mib']:.0f}; load {r['load_1min'][0]:.1f} -> {r['load_1min'][1]:.1f}",
                flush=True,
            )
    return {
        "pool": {"per_shard": args.per_shard, "image_size": args.image_size, "storage": "local disk"},
        "embed": embed,
        "cpus": args.cpus,
        "sizes": results,
    }


def print_embed_table(sizes: list[int], out: dict[str, Any]) -> None:
    """Samples/s and peak RSS per size, each with its ratio to the first size, next to the size ratio."""
    first, e = sizes[0], out["embed"]
    print(
        f"\nembedding pass, local Ray of {out['cpus']} CPUs, 1 teacher actor ({e['cpus_per_actor']} CPU, batch "
        f"{e['batch_size']}), read tasks of {e['cpus_per_read']} CPU, {out['pool']['per_shard']} samples per shard; "
        f"ratios against {first} samples"
    )
    print(
        f"{'pool':>8}{'size x':>8}{'samples/s':>11}{'ratio':>7}{'worker peak MiB':>17}{'ratio':>7}"
        f"{'actor':>8}{'read':>8}{'driver peak MiB':>17}{'ratio':>7}"
    )
    base = out["sizes"][str(first)]
    for n in sizes:
        r = out["sizes"][str(n)]
        roles = r["role_peak_rss_mib"]
        print(
            f"{n:>8}{n / first:>8.0f}{r['samples_per_s']:>11.0f}{r['samples_per_s'] / base['samples_per_s']:>7.2f}"
            f"{r['worker_peak_rss_mib']:>17.0f}{r['worker_peak_rss_mib'] / base['worker_peak_rss_mib']:>7.2f}"
            f"{roles.get('actor', 0):>8.0f}{roles.get('read', 0):>8.0f}"
            f"{r['driver_peak_rss_mib']:>17.0f}{r['driver_peak_rss_mib'] / base['driver_peak_rss_mib']:>7.2f}"
        )


def score_sizes(args: argparse.Namespace) -> dict[str, Any]:
    """Score a pool of random unit embeddings of each size; per size seconds and samples/s per pass and the peaks."""
    names = ("dim", "batch", "repeats", "window_batches", "target", "cpus", "actors", "per_shard")
    settings = {k: getattr(args, k) for k in names}
    results: dict[str, Any] = {}
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="cliplab-bench-score-") as tmp:
            run = {
                **settings,
                "pool_urls": write_embedded(Path(tmp) / "pool", n, args.dim, args.per_shard, 0),
                "target_urls": write_embedded(Path(tmp) / "target", args.target, args.dim, args.per_shard, 1),
            }
            r = results[str(n)] = _in_fresh_process(score_one_size, tmp, run)
        print(
            f"size {n}: {r['seconds']:.1f}s, samples/s "
            + ", ".join(f"{k} {v:.0f}" for k, v in r["samples_per_s"].items())
            + f", worker peaks MiB {', '.join(f'{k} {v:.0f}' for k, v in sorted(r['role_peak_rss_mib'].items()))}"
            + f", driver {r['driver_peak_rss_mib']:.0f}; load {r['load_1min'][0]:.1f} -> {r['load_1min'][1]:.1f}",
            flush=True,
        )
    return {"settings": settings, "sizes": results}


def print_score_table(sizes: list[int], out: dict[str, Any]) -> None:
    """Samples/s per pass and the peak RSS per worker role and of the driver, each with its ratio to the first size."""
    first, s = sizes[0], out["settings"]
    print(
        f"\nscoring pass, local Ray of {s['cpus']} CPUs, {s['actors']} actor(s), d={s['dim']}, |B|={s['batch']}, "
        f"K={s['repeats']}, windows of {s['window_batches']} batches, {s['target']} target rows, "
        f"{s['per_shard']} rows per shard; ratios against {first} samples"
    )
    print(
        f"{'pool':>8}  {'pass':<24}{'samples/s':>11}{'ratio':>7}{'worker peak MiB':>17}{'ratio':>7}"
        f"{'actor':>8}{'read':>8}{'driver peak MiB':>17}{'ratio':>7}"
    )
    base = out["sizes"][str(first)]
    for n in sizes:
        r = out["sizes"][str(n)]
        roles = r["role_peak_rss_mib"]
        for stage in PASSES:
            rate, base_rate = r["samples_per_s"][stage], base["samples_per_s"][stage]
            print(
                f"{n:>8}  {stage:<24}{rate:>11.0f}{rate / base_rate:>7.2f}"
                f"{r['worker_peak_rss_mib']:>17.0f}{r['worker_peak_rss_mib'] / base['worker_peak_rss_mib']:>7.2f}"
                f"{roles.get('actor', 0):>8.0f}{roles.get('read', 0):>8.0f}"
                f"{r['driver_peak_rss_mib']:>17.0f}{r['driver_peak_rss_mib'] / base['driver_peak_rss_mib']:>7.2f}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `--smoke` shrinks every size and count to a run of about a minute."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("embed", "score", "all"), default="all")
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000, 160000])
    p.add_argument("--smoke", action="store_true", help=f"sizes {SMOKE_SIZES}, 100 samples per shard")
    p.add_argument("--json", type=Path, help="write every figure here")
    g = p.add_argument_group("embed")
    p.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1), help="CPUs of the local Ray")
    p.add_argument("--per-shard", type=int, default=1000, help="pool samples per shard (both stages)")
    g.add_argument("--image-size", type=int, default=32, help="SynthScenes image side (the teacher's is 32)")
    g.add_argument("--embed-batch", type=int, default=256, help="embed.batch_size: images per teacher forward")
    g.add_argument("--cpus-per-read", type=float, default=0.5, help="embed.cpus_per_read (1.0: fused into actor)")
    g = p.add_argument_group("score")
    g.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B/32: 512, ViT-L/14: 768)")
    g.add_argument("--batch", type=int, default=4096, help="negCLIPLoss |B|")
    g.add_argument("--repeats", type=int, default=2, help="negCLIPLoss K")
    g.add_argument("--window-batches", type=int, default=2, help="negCLIPLoss window size in batches of |B|")
    g.add_argument("--target", type=int, default=1000, help="NormSim target set size")
    g.add_argument("--actors", type=int, default=1, help="score.actors: scoring actors (1 CPU each)")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.per_shard, args.batch, args.target = SMOKE_SIZES, 100, 128, 100
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the chosen stages over every size, print their tables, and write the figures to `--json`."""
    args = parse_args(argv)
    out: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "sizes": args.sizes}
    if args.stage in ("embed", "all"):
        out["embed"] = embed_sizes(args)
    if args.stage in ("score", "all"):
        out["score"] = score_sizes(args)
    if "embed" in out:
        print_embed_table(args.sizes, out["embed"])
    if "score" in out:
        print_score_table(args.sizes, out["score"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
