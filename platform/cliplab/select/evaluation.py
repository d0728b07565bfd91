"""How well selections at equal kept fractions reject noisy captions and move towards a target distribution.

For SynthScenes pools, where every sample's json says whether its caption is `noisy` (belongs to another
image) and its image's ground truth is known, each method (a chain of recipe steps, or a seeded random
subset as the reference) keeps a fraction f of the pool. A method is scored by the precision and recall
of *rejecting* the noisy samples (a perfect filter at f = 1 - noisy share has both at 1; random has
precision = noisy share, recall = 1 - f), by the share of kept samples that come from the target's
distribution (`in_target`, e.g. the main shape is one of the target set's shapes) against the pool's
share, and by the mean NormSim_inf of the kept samples (teacher-space closeness to the target images).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cliplab.select.recipes import Step, apply_chain


@dataclass(frozen=True)
class Method:
    """A named selection at kept fraction `fraction` of the pool: recipe steps, or random when `steps` is empty."""

    name: str
    fraction: float
    steps: tuple[Step, ...] = ()


def standard_methods(fractions: Sequence[float], normsim: bool) -> list[Method]:
    """CLIPScore, negCLIPLoss and (with a target) negCLIPLoss + NormSim_inf at each fraction, plus random.

    negCLIPLoss + NormSim keeps the top f + (1 - f)/2 of the pool by negCLIPLoss, then the top f by NormSim_inf
    of those (the paper's recipe, 30% then 20%, has the same shape: a loose negCLIPLoss cut, NormSim decides).
    """
    out = []
    for f in fractions:
        out += [Method("random", f), Method("clipscore", f, (Step("clipscore", f),))]
        out.append(Method("negclip", f, (Step("negclip", f),)))
        if normsim:
            out.append(Method("negclip+normsim_inf", f, (Step("negclip", f + (1 - f) / 2), Step("normsim_inf", f))))
    return out


def kept_mask(method: Method, scores: Mapping[str, np.ndarray], n: int, seed: int = 0) -> np.ndarray:
    """Boolean mask of the pool samples `method` keeps (random: a seeded subset of floor(f n))."""
    mask = np.zeros(n, dtype=bool)
    if method.steps:
        mask[apply_chain(scores, list(method.steps))[-1]] = True
    else:
        mask[np.random.default_rng(seed).choice(n, int(method.fraction * n), replace=False)] = True
    return mask


def evaluate(
    method: Method,
    kept: np.ndarray,
    noisy: np.ndarray,
    in_target: np.ndarray,
    normsim: np.ndarray | None,
) -> dict[str, float | str]:
    """One table row: reject precision/recall of noisy samples, target share kept, mean NormSim_inf kept."""
    bad, rejected = noisy.astype(bool), ~kept
    caught = float((bad & rejected).sum())
    row: dict[str, float | str] = {
        "method": method.name,
        "kept": method.fraction,
        "reject_precision": caught / max(1, int(rejected.sum())),
        "reject_recall": caught / max(1, int(bad.sum())),
        "target_share": float(in_target[kept].mean()) if kept.any() else float("nan"),
    }
    if normsim is not None:
        row["normsim_inf_mean"] = float(normsim[kept].mean()) if kept.any() else float("nan")
    return row


def format_table(rows: list[dict[str, float | str]], pool_noisy: float, pool_target: float) -> str:
    """The rows as an aligned text table, with the pool's noisy and target shares underneath."""
    order = ("method", "kept", "reject_precision", "reject_recall", "target_share", "normsim_inf_mean")
    cols = [c for c in order if c in rows[0]]
    width = {c: max(len(c), 20 if c == "method" else 8) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) if c == "method" else c.rjust(width[c]) for c in cols)]
    for r in rows:
        cells = [str(r[c]).ljust(width[c]) if c == "method" else f"{r[c]:.3f}".rjust(width[c]) for c in cols]
        lines.append("  ".join(cells))
    lines.append(f"pool: {pool_noisy:.3f} noisy captions, {pool_target:.3f} of samples from the target's distribution")
    return "\n".join(lines)
