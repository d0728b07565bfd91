"""Run one training command as a user would and time its progress lines: start-up and steady-state samples/s.

Each line is timestamped as it arrives; a side's parser turns a progress line into the samples trained so
far. Steady state is the rate from the first progress line at or past a third of the run's samples (and
never before the second line: the first window holds start-up and first-step work) to the last line. The
window starts at the same point of the run on every side, whichever steps each side logs (open_clip_train
logs after its first step, cliplab after its `log_every`-th), and spans most of the run, so that a line's
delivery jitter (cliplab's lines reach the driver through Ray's log monitor, ~0.03-0.2 s) is small
against it. Start-up is the time to the end of the first step, the first line's time less the
steady-state time of the steps it reported after the first.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RESULT_PREFIX = "BENCH "  # a line `BENCH {json}` carries a worker's own measurements


@dataclass
class Timing:
    """What one run measured; `results` are its `BENCH` lines."""

    startup_s: float
    samples_per_s: float
    results: list[dict] = field(default_factory=list)


def summarise(points: Sequence[tuple[float, int]], samples_per_step: int) -> tuple[float, float]:
    """(start-up s, steady samples/s) from (seconds since launch, samples done) at each progress line."""
    if len(points) < 3:
        raise ValueError(f"need at least 3 progress lines for a steady-state rate, got {len(points)}")
    (t1, n1), (tn, nn) = points[0], points[-1]
    t2, n2 = steady_start(points)
    rate = (nn - n2) / (tn - t2)
    return t1 - (n1 - samples_per_step) / rate, rate


def steady_start(points: Sequence[tuple[float, int]]) -> tuple[float, int]:
    """The point the steady-state window starts at: the first from the second on at or past 1/3 of the samples."""
    third = points[-1][1] / 3
    return next((p for p in points[1:-1] if p[1] >= third), points[1])


def bench_results(line: str) -> list[dict]:
    """Every `BENCH {json}` object in one line of output (two ranks' prints can land on the same line)."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(part)[0] for part in line.split(RESULT_PREFIX)[1:]]


def timed_run(
    cmd: Sequence[str],
    env: Mapping[str, str],
    samples_done: Callable[[str], int | None],
    samples_per_step: int,
    log: Path,
) -> Timing:
    """Run `cmd` to the end (its output goes to `log`); raises if it fails."""
    points: list[tuple[float, int]] = []
    results = []
    start = time.perf_counter()
    with log.open("w", buffering=1) as out:  # line-buffered: the log can be followed while it runs
        out.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            done = samples_done(line)
            if done is not None:
                points.append((time.perf_counter() - start, done))
            results += bench_results(line)
        if proc.wait():
            raise RuntimeError(f"{cmd[0]} ... exited with {proc.returncode}; its output is in {log}")
    startup, rate = summarise(points, samples_per_step)
    return Timing(startup, rate, results)
