"""One image-text score for single- and multi-branch models: mean over branches of the per-branch cosine."""

from __future__ import annotations

import torch


def similarity(image: torch.Tensor, text: torch.Tensor, branch: int | None = None) -> torch.Tensor:
    """(N_img, N_txt) scores; image is (N, D) or (N, M, D) unit-norm, text (K, D) unit-norm.

    Multi-branch models are scored by the mean of per-branch logits (holistic.md "Inference"),
    or by one branch when `branch` is given.
    """
    if image.ndim == 2:
        return image @ text.T
    if branch is not None:
        return image[:, branch] @ text.T
    return torch.einsum("nmd,kd->nk", image, text) / image.shape[1]
