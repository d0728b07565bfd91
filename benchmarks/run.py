"""cliplab's throughput and memory comparisons, each side run interleaved A,B,A,B... in one session.

    .venv/bin/python benchmarks/run.py [--only open_clip ddp zero objectives] [--pairs 3] [--json PATH] [--smoke]

1. open_clip: `cliplab train` with 1 Ray worker against open_clip's trainer (`python -m open_clip_train.main`):
   steady-state samples/s and start-up to the first step.
2. ddp: `cliplab train` on Ray Train + DeepSpeed ZeRO-2 with 2 workers against `torchrun` DDP.
3. zero: ZeRO 0/1/2/3 with 2 workers: samples/s, peak RSS, its growth over the RSS before the model is built
   (torch, deepspeed and open_clip alone hold ~0.9 GiB, alike on every side) and parameter + optimizer-state
   bytes per worker.
4. objectives: MCD and holistic CLIP step time over the CLIP step's; the reader's samples/s over the step's.

All sides read the same SynthScenes shards (written once under --workdir) with the same model, batch and fp32
(the ZeRO comparison: bf16 by default, `--zero-precision`).
A table row is A against B: both sides' medians and the median and spread [min-max] of the per-pair ratios
A/B. The cliplab sides connect to one local Ray started by this process (`RAY_ADDRESS`), so their start-up
excludes starting Ray. Every side's output is kept in --workdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ray

from ab import Spread, pair_ratios, spread
from cliplab.runtime import start_local_ray
from procs import Timing
from vs_open_clip import WEBDATASET_DIR
from workload import make_workload

COMPARISONS = ("open_clip", "ddp", "zero", "objectives")  # objectives last: it sets torch.distributed env vars
MIB = 2**20


@dataclass
class Row:
    """One measure of side A against side B, per round, and the goal the A/B ratio is held to (if any)."""

    comparison: str
    measure: str
    a: str
    b: str
    a_values: list[float]
    b_values: list[float]
    goal: str = ""

    @property
    def ratio(self) -> Spread:
        return spread(pair_ratios(self.a_values, self.b_values))


def _timing_rows(comparison: str, sides: dict[str, list[Timing]], rate_goal: str, startup_goal: str) -> list[Row]:
    (a, ta), (b, tb) = sides.items()
    return [
        Row(
            comparison, "train samples/s", a, b, [t.samples_per_s for t in ta], [t.samples_per_s for t in tb], rate_goal
        ),
        Row(
            comparison,
            "start-up to 1st step s",
            a,
            b,
            [t.startup_s for t in ta],
            [t.startup_s for t in tb],
            startup_goal,
        ),
    ]


def _worst(timings: list[Timing], key: str) -> list[float]:
    """Per round, the largest of the workers' `key`, in MiB."""
    return [max(r[key] for r in t.results) / MIB for t in timings]


def _worst_growth(timings: list[Timing]) -> list[float]:
    """Per round, the largest of the workers' peak RSS less their RSS before building the model, in MiB."""
    return [max(r["peak_rss_bytes"] - r["start_rss_bytes"] for r in t.results) / MIB for t in timings]


def _zero_rows(sides: dict[str, list[Timing]]) -> list[Row]:
    base, *others = sides
    rows = []
    for name in others:
        goal = "<= 0.60" if name == "ZeRO-3" else ""
        rows += [
            Row(
                "zero",
                "train samples/s",
                name,
                base,
                [t.samples_per_s for t in sides[name]],
                [t.samples_per_s for t in sides[base]],
            ),
            Row(
                "zero",
                "peak RSS/worker MiB",
                name,
                base,
                _worst(sides[name], "peak_rss_bytes"),
                _worst(sides[base], "peak_rss_bytes"),
                goal,
            ),
            Row(
                "zero",
                "RSS growth/worker MiB",
                name,
                base,
                _worst_growth(sides[name]),
                _worst_growth(sides[base]),
            ),
            Row(
                "zero",
                "param+opt state/rank MiB",
                name,
                base,
                _worst(sides[name], "state_bytes"),
                _worst(sides[base], "state_bytes"),
            ),
        ]
    return rows


def _objective_rows(groups: dict[str, dict[str, list[float]]]) -> list[Row]:
    def ms(rates: list[float]) -> list[float]:
        return [1000 / r for r in rates]

    mcd, holistic, reader = groups["mcd"], groups["holistic"], groups["reader"]
    vit = holistic.pop("ViT CLIP step")
    rows = [Row("objectives", "step ms/sample", "MCD step", "CLIP step", ms(mcd["MCD step"]), ms(mcd["CLIP step"]))]
    rows += [
        Row("objectives", "step ms/sample (ViT)", name, "ViT CLIP step", ms(v), ms(vit)) for name, v in holistic.items()
    ]
    rows.append(Row("objectives", "samples/s", "reader", "CLIP step", reader["reader"], reader["CLIP step"], ">= 1.0"))
    return rows


def table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width text table."""
    head = (
        f"{'comparison':<11}{'measure':<26}{'A':<22}{'A med':>9}  {'B':<16}{'B med':>9}{'A/B med':>9}  "
        f"{'[min-max]':<14}goal"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        q = r.ratio
        a, b = spread(r.a_values).median, spread(r.b_values).median
        lines.append(
            f"{r.comparison:<11}{r.measure:<26}{r.a:<22}{a:>9.1f}  {r.b:<16}{b:>9.1f}{q.median:>9.2f}  "
            f"{f'[{q.low:.2f}-{q.high:.2f}]':<14}{r.goal}"
        )
    return "\n".join(lines)


def as_json(rows: Sequence[Row], settings: dict) -> dict:
    """The settings and every row with its per-round values and ratio statistics."""
    return {
        "settings": settings,
        "rows": [
            {
                **dataclasses.asdict(r),
                "ratio": dataclasses.asdict(r.ratio),
                "ratios": pair_ratios(r.a_values, r.b_values),
            }
            for r in rows
        ],
    }


def run(args: argparse.Namespace, workdir: Path) -> list[Row]:
    """Write the shards, run the chosen comparisons in COMPARISONS order, return their rows."""
    # imported here: each comparison module pulls in torch or Ray only when it runs
    import objectives
    import vs_ddp
    import vs_open_clip
    import zero_stages

    w = make_workload(workdir, args.samples, args.batch, args.steps, args.log_every)
    chosen = [c for c in COMPARISONS if c in args.only]
    rows: list[Row] = []
    if {"open_clip", "ddp"} & set(chosen):
        start_local_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else ""
    if "open_clip" in chosen:
        sides = vs_open_clip.compare(w, args.pairs, os.cpu_count() or 1, args.webdataset_dir, address)
        rows += _timing_rows("open_clip", sides, ">= 1.0", "<= 3.0")
    if "ddp" in chosen:
        rows += _timing_rows("ddp", vs_ddp.compare(w, args.pairs, address), ">= 0.90", "")
    ray.shutdown()
    if "zero" in chosen:
        zero = {"batch": args.zero_batch, "steps": args.zero_steps, "log_every": args.zero_steps // 3}
        large = dataclasses.replace(w, precision=args.zero_precision, **zero)
        rows += _zero_rows(zero_stages.compare(large, args.pairs, args.zero_stages))
    if "objectives" in chosen:
        objectives.single_process_group()
        rows += _objective_rows(objectives.compare(dataclasses.replace(w, steps=args.objective_steps), args.pairs))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=COMPARISONS, default=list(COMPARISONS))
    p.add_argument("--pairs", type=int, default=3, help="rounds of each comparison (A,B per round)")
    p.add_argument("--json", type=Path, help="write the settings, rows and per-round values here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and 1 pair: checks the runner end to end")
    p.add_argument("--samples", type=int, default=4000, help="SynthScenes samples written (8 shards)")
    p.add_argument("--batch", type=int, default=32, help="batch per worker")
    p.add_argument("--steps", type=int, default=36, help="steps per training run")
    p.add_argument("--log-every", type=int, default=6, help="steps between progress lines (timing points)")
    p.add_argument("--zero-stages", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO-0 first: the baseline")
    p.add_argument("--zero-batch", type=int, default=4)
    p.add_argument("--zero-steps", type=int, default=6)
    p.add_argument(
        "--zero-precision",
        choices=("bf16", "fp32"),
        default="bf16",
        help="the ZeRO comparison's precision: bf16 keeps fp32 master weights, the state ZeRO partitions",
    )
    p.add_argument("--objective-steps", type=int, default=6, help="timed steps per objective measurement")
    p.add_argument("--workdir", type=Path, help="shards, configs and every side's log (default: a temporary one)")
    p.add_argument(
        "--webdataset-dir",
        type=Path,
        default=WEBDATASET_DIR,
        help="where open_clip_train's webdataset is installed (kept between runs)",
    )
    args = p.parse_args()
    if args.smoke:
        args.pairs, args.samples, args.batch, args.steps, args.log_every = 1, 800, 16, 6, 2
        args.zero_batch, args.zero_steps, args.objective_steps = 4, 3, 2
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = run(args, workdir)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(
        f"\ncliplab benchmarks: {args.pairs} interleaved pair(s), batch {args.batch}/worker, fp32 "
        f"(ZeRO: {args.zero_precision}), {os.cpu_count()} cores; ratio = A/B per pair"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(as_json(rows, settings), indent=2))


if __name__ == "__main__":
    main()
