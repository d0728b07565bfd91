"""ViT-B/32 at batch 256 on one GPU: cliplab eager, compiled and with JPEG decode on the GPU, next to open_clip_train.

    benchmarks/gpu.sh [--smoke] [--json PATH] [--workdir DIR] [--steps N] [--ray-address ADDR]

Writes 224-px SynthScenes shards to local disk, then trains every side once on them: each cliplab variant is
a 1-worker Ray Train run (bf16, DeepSpeed's fused Adam, pinned memory), open_clip_train runs with
`--precision amp_bf16` from its own webdataset (0.2.86, in a directory of its own). It prints steady-state
samples/s, MFU and start-up per side and each side's ratio to open_clip_train. MFU is cliplab's own FLOP
count per sample (one model for every side) times samples/s over the device's peak
(`cliplab.train.throughput.PEAK_FLOPS`). One run per side, not interleaved pairs: the whole script has to
fit in 8 minutes of a lent GPU; `benchmarks/run.py` is the interleaved A/B runner.

--smoke runs eager, compiled + GPU decode (between them every switch's code path) and open_clip_train on
CPU with the demo's tiny model, 64 px and a few steps (no peak, so no MFU), compiling with aot_eager (the
compile path without inductor's codegen, minutes cold on 2 cores): the suite runs it, so the script cannot
rot on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from cliplab.config import apply_overrides
from cliplab.runtime import start_local_ray
from cliplab.train.throughput import device_peak_flops
from procs import timed_run
from vs_open_clip import WEBDATASET_DIR, open_clip_command, open_clip_run
from workload import SMALL_MODEL, Workload, cliplab_samples, cliplab_train, make_workload

BASELINE = "open_clip_train"
VARIANTS: dict[str, list[str]] = {
    "cliplab eager": [],
    "cliplab compiled": ["compute.compile=model"],
    "cliplab GPU decode": ["data.decode=device"],
    "cliplab compiled + GPU decode": ["compute.compile=model", "data.decode=device"],
}
SMOKE_VARIANTS = ("cliplab eager", "cliplab compiled + GPU decode")  # together they take every switch's path
GOAL = ("cliplab compiled + GPU decode", 4500.0, 1.8)  # samples/s and ratio to open_clip_train the issue asks for
LINE_VALUE = re.compile(r"\| (tflops_per_s|mfu) ([\d.]+)(%?)")


@dataclass(frozen=True)
class Setting:
    """What every side trains: model, image size, batch, precision, device, loader workers."""

    model: str | dict[str, Any]
    image_size: int
    batch: int
    precision: str
    gpu: bool
    loader_workers: int
    compile_backend: str | None = None


@dataclass
class Side:
    """One side's figures."""

    name: str
    samples_per_s: float
    startup_s: float
    mfu: float | None
    flops_per_sample: float | None


def settings(smoke: bool) -> Setting:
    if smoke:
        return Setting(SMALL_MODEL, 64, 8, "fp32", gpu=False, loader_workers=1, compile_backend="aot_eager")
    return Setting("ViT-B-32", 224, 256, "bf16", gpu=True, loader_workers=min(8, max(1, (os.cpu_count() or 2) - 4)))


def cliplab_tree(w: Workload, s: Setting, name: str, overrides: list[str]) -> dict[str, Any]:
    """The experiment for one cliplab variant: ZeRO-0 at one worker (nothing to partition)."""
    tree = w.cliplab_tree(name, SMALL_MODEL, workers=1, zero=0, threads=2 if s.gpu else 1)
    tree["model"] = {"name": s.model} if isinstance(s.model, str) else {"config": s.model}
    tree["data"].update(num_workers=s.loader_workers, crop_scale=[0.9, 1.0])
    tree["scaling"].update(use_gpu=s.gpu, gpus_per_worker=1 if s.gpu else 0)
    if s.compile_backend:
        tree["compute"] = {"compile_backend": s.compile_backend}
    return apply_overrides(tree, overrides)


def last_line_values(log: Path) -> dict[str, float]:
    """tflops_per_s and mfu (a fraction) from the last cliplab progress line that has them."""
    values: dict[str, float] = {}
    for line in log.read_text().splitlines():
        found = {k: float(v) / (100 if pct else 1) for k, v, pct in LINE_VALUE.findall(line)}
        if "tflops_per_s" in found:
            values = found
    return values


def run_cliplab(w: Workload, s: Setting, name: str, overrides: list[str], address: str) -> Side:
    slug = re.sub(r"\W+", "-", name).strip("-")
    config = w.write_config(slug, cliplab_tree(w, s, slug, overrides))
    cmd, env = cliplab_train(config, address)
    log = w.log_path(slug)
    timing = timed_run(cmd, env, cliplab_samples(w.batch, 1), w.batch, log)
    values = last_line_values(log)
    flops = values["tflops_per_s"] * 1e12 / timing.samples_per_s if "tflops_per_s" in values else None
    return Side(name, timing.samples_per_s, timing.startup_s, values.get("mfu"), flops)


def run_open_clip(w: Workload, s: Setting, webdataset_dir: Path) -> Side:
    if isinstance(s.model, str):
        model, device, precision = s.model, "cuda", "amp_bf16"
    else:
        model, device, precision = f"local-dir:{w.open_clip_model_dir(s.model)}", "cpu", s.precision
    extra = ("--dataset-resampled", "--lr", "5e-4", "--warmup", "10")
    cmd = open_clip_command(w, model, s.loader_workers, device, precision, extra)
    timing = open_clip_run(cmd, w, webdataset_dir, threads=2 if s.gpu else 1)
    return Side(BASELINE, timing.samples_per_s, timing.startup_s, None, None)


def with_mfu(sides: list[Side], peak: float | None) -> list[Side]:
    """open_clip_train's MFU from cliplab's FLOPs per sample of the same model (eager count)."""
    flops = next((x.flops_per_sample for x in sides if x.flops_per_sample), None)
    for x in sides:
        if x.mfu is None and flops and peak:
            x.mfu = flops * x.samples_per_s / peak
    return sides


def table(sides: list[Side]) -> str:
    base = next(x.samples_per_s for x in sides if x.name == BASELINE)
    rows = [f"{'side':<32} {'samples/s':>10} {'vs ' + BASELINE:>20} {'MFU':>7} {'start-up s':>11}"]
    for x in sides:
        mfu = f"{x.mfu:.1%}" if x.mfu is not None else "n/a"
        ratio = x.samples_per_s / base
        rows.append(f"{x.name:<32} {x.samples_per_s:>10.1f} {ratio:>20.2f} {mfu:>7} {x.startup_s:>11.1f}")
    name, rate, ratio = GOAL
    goal = next((x for x in sides if x.name == name), None)
    if goal is not None:
        met = goal.samples_per_s >= rate and goal.samples_per_s / base >= ratio
        rows.append(f"goal: {name} >= {rate:.0f} samples/s and >= {ratio}x {BASELINE}: {'met' if met else 'missed'}")
    return "\n".join(rows)


def run(args: argparse.Namespace, workdir: Path) -> list[Side]:
    s = settings(args.smoke)
    if s.gpu and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.sh needs a CUDA GPU; use --smoke to check the script on CPU")
    steps = args.steps or (4 if args.smoke else 240)
    log_every = max(1, steps // 8) if not args.smoke else 1
    samples = 400 if args.smoke else args.samples
    t0 = time.perf_counter()
    w = make_workload(workdir, samples, s.batch, steps, log_every, image_size=s.image_size, shards=16)
    print(f"gpu benchmark: {samples} {s.image_size}-px samples written in {time.perf_counter() - t0:.0f}s", flush=True)
    if not args.ray_address:
        start_local_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    address = args.ray_address or ray.get_runtime_context().gcs_address
    sides = []
    try:
        for name, overrides in VARIANTS.items():
            if args.smoke and name not in SMOKE_VARIANTS:
                continue
            sides.append(run_cliplab(w, s, name, overrides, address))
            print(f"gpu benchmark: {name}: {sides[-1].samples_per_s:.1f} samples/s", flush=True)
    finally:
        if not args.ray_address:
            ray.shutdown()
    sides.append(run_open_clip(w, s, args.webdataset_dir))
    peak = device_peak_flops(torch.device("cuda"), s.precision) if s.gpu else None
    return with_mfu(sides, peak)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps: checks the script end to end")
    p.add_argument("--steps", type=int, help="steps per run (default 240; smoke 4)")
    p.add_argument("--samples", type=int, default=8192, help="224-px SynthScenes samples written (16 shards)")
    p.add_argument("--workdir", type=Path, help="shards, configs and every side's log (default: a temporary one)")
    p.add_argument("--webdataset-dir", type=Path, default=WEBDATASET_DIR, help="open_clip_train's webdataset")
    p.add_argument("--json", type=Path, help="write every side's figures here")
    p.add_argument("--ray-address", help="a running Ray for the cliplab sides (default: start a local one)")
    args = p.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        sides = run(args, workdir)
    print(f"\n{table(sides)}\n(total {time.perf_counter() - started:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps({"smoke": args.smoke, "sides": [asdict(x) for x in sides]}, indent=2))


if __name__ == "__main__":
    main()
