"""Selection recipes over per-sample scores: top fractions, thresholds, chains, and set algebra with subsets.

A chain is a list of steps applied in order to the survivors of the previous step. A fraction is
always counted against the *whole pool* N (spec ambiguity 3, the reference code's semantics): the
paper's recipe is [negCLIPLoss top 0.30, NormSim_inf top 0.20], i.e. keep floor(0.3 N) by negCLIPLoss,
then of those the floor(0.2 N) with the highest NormSim_inf: 20% of the pool. Ranking is by score,
ties broken by pool position (earlier first), so a selection is a pure function of scores and order.
A threshold step keeps survivors with score >= threshold (DataComp's `>=`). Any other step is a
function from the survivors to the survivors it keeps (near-duplicate removal, select/dedup.py,
which needs the pool's embeddings and Ray; this module stays pure).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cliplab.select import uids as U


@dataclass(frozen=True)
class Step:
    """Keep the top `fraction` of the pool by `score`, or the samples with `score >= threshold`."""

    score: str
    fraction: float | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.threshold is None):
            raise ValueError(f"step on {self.score}: give exactly one of fraction or threshold")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"step on {self.score}: fraction must be in (0, 1], got {self.fraction}")


PAPER_RECIPE = (Step("negclip", fraction=0.3), Step("normsim_inf", fraction=0.2))
Filter = Callable[[np.ndarray], np.ndarray]  # survivors (sorted pool indices) -> the sorted survivors it keeps


def top_k(scores: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The k candidates (pool indices) with the highest scores, ties to the lower index, sorted by index."""
    if k >= len(candidates):
        return np.sort(candidates)
    order = np.lexsort((candidates, -scores[candidates].astype(np.float64)))
    return np.sort(candidates[order[:k]])


def apply_chain(scores: Mapping[str, np.ndarray], steps: Sequence[Step | Filter]) -> list[np.ndarray]:
    """Pool indices kept after each step (one array per step, sorted); fractions of the whole pool."""
    n = len(next(iter(scores.values())))
    kept = np.arange(n)
    out = []
    for step in steps:
        if not isinstance(step, Step):
            kept = step(kept)
            out.append(kept)
            continue
        if step.score not in scores:
            raise KeyError(f"recipe step needs score {step.score!r}; computed: {sorted(scores)}")
        s = scores[step.score]
        if step.fraction is not None:
            kept = top_k(s, kept, math.floor(step.fraction * n))
        else:
            kept = kept[s[kept] >= step.threshold]
        out.append(kept)
    return out


def combine(selected: np.ndarray, op: str, other: np.ndarray) -> np.ndarray:
    """`union`, `intersection` or `difference` of two `u8,u8` uid arrays (as sets, sorted)."""
    ops = {"union": U.union, "intersection": U.intersection, "difference": U.difference}
    if op not in ops:
        raise ValueError(f"unknown set operation {op!r}; one of {sorted(ops)}")
    return ops[op](selected, other)
