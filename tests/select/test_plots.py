"""The selection run's plots: a score-vs-score scatter panel per pair of scores."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np


def test_score_scatter_draws_every_pair_of_scores() -> None:
    from cliplab.select.plots import score_scatter

    rng = np.random.default_rng(0)
    scores = {k: rng.normal(size=50).astype(np.float32) for k in ("clipscore", "negclip", "normsim_inf")}
    selected, noisy = rng.random(50) < 0.5, (rng.random(50) < 0.3).astype(np.int8)
    fig = score_scatter(scores, selected, noisy, "t", max_points=20)
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes] == [
        ("clipscore", "negclip"),
        ("clipscore", "normsim_inf"),
        ("negclip", "normsim_inf"),
    ]
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 20  # the subsample only
    single = score_scatter({"clipscore": scores["clipscore"]}, selected, -np.ones(50), "t")
    assert len(single.axes) == 1
    plt.close("all")
