"""Image<->text retrieval on aligned pairs (sample i's image matches sample i's text): R1/R5/R10, mean rank."""

from __future__ import annotations

import torch

from cliplab.eval.scoring import similarity


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """0-based rank of the diagonal entry in each row; ties count against the match (pessimistic)."""
    positive = scores.diagonal()[:, None]
    return (scores > positive).sum(1) + ((scores == positive).sum(1) - 1)


def retrieval_metrics(image: torch.Tensor, text: torch.Tensor, branch: int | None = None) -> dict[str, float]:
    scores = similarity(image, text, branch)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", _ranks(scores)), ("t2i", _ranks(scores.T))):
        for k in (1, 5, 10):
            out[f"{name}_R{k}"] = (ranks < k).float().mean().item()
        out[f"{name}_mean_rank"] = ranks.float().mean().item() + 1
    return out
