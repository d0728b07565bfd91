"""Interleaved A/B measurement and its statistics: each round runs every side once, in a fixed order.

Running A,B,A,B... instead of all A then all B makes a drift in the machine's load hit both sides of a pair
alike; the per-pair ratios are summarised by their median and their spread [min-max].
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def schedule(names: Sequence[str], pairs: int) -> list[str]:
    """The run order: `names` once per round, `pairs` rounds (A,B,A,B,... for two sides)."""
    if pairs < 1:
        raise ValueError(f"pairs must be at least 1, got {pairs}")
    return [name for _ in range(pairs) for name in names]


def interleave(sides: Mapping[str, Callable[[], T]], pairs: int) -> dict[str, list[T]]:
    """Call each side once per round in `schedule` order; each side's results in round order."""
    results: dict[str, list[T]] = {name: [] for name in sides}
    for name in schedule(list(sides), pairs):
        results[name].append(sides[name]())
    return results


@dataclass(frozen=True)
class Spread:
    """Median and range of a set of measurements."""

    median: float
    low: float
    high: float


def spread(values: Sequence[float]) -> Spread:
    """Median, min and max of `values` (at least one)."""
    if not values:
        raise ValueError("no values")
    return Spread(statistics.median(values), min(values), max(values))


def pair_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a[i] / b[i] for each round i: the two sides of one pair ran back to back under the same load."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} A values against {len(b)} B values")
    return [x / y for x, y in zip(a, b, strict=True)]
