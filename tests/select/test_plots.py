"""The selection run's plots: a score-vs-score scatter panel per pair of scores."""

from __future__ import annotations

import numpy as np


def test_score_scatter_draws_every_pair_of_scores(tmp_path) -> None:
    from PIL import Image

    from cliplab.select.plots import score_scatter

    rng = np.random.default_rng(0)
    scores = {k: rng.normal(size=50).astype(np.float32) for k in ("clipscore", "negclip", "normsim_inf")}
    selected, noisy = rng.random(50) < 0.5, (rng.random(50) < 0.3).astype(np.int8)
    path = score_scatter(scores, selected, noisy, tmp_path / "s.png", "t", max_points=20)
    width, height = Image.open(path).size
    assert width == 3 * 420 and height == 400  # three pairs side by side
    single = score_scatter({"clipscore": scores["clipscore"]}, selected, -np.ones(50), tmp_path / "one.png", "t")
    assert single.is_file()
