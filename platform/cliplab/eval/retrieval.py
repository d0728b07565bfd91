"""Image<->text retrieval on aligned pairs (sample i's image matches sample i's text): R1/R5/R10, mean rank.

Captions repeat (SynthScenes' "red colour", web captions such as "a red circle"): with `groups` (the caption
text of each pair), every image whose caption equals the query's, and every text equal to the image's
caption, is a correct match; a rank counts the wrong items scored at least as high as the best correct one.
Without `groups` only the pair itself is correct.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cliplab.eval.scoring import similarity


def group_ids(texts: Sequence[str]) -> torch.Tensor:
    """(N,) ids, equal where the texts are equal."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(t, len(ids)) for t in texts])


def _ranks(scores: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's best correct entry; ties with wrong entries count against it (pessimistic)."""
    best = scores.masked_fill(~same, float("-inf")).max(dim=1, keepdim=True).values
    return ((scores >= best) & ~same).sum(1)


def retrieval_metrics(
    image: torch.Tensor, text: torch.Tensor, branch: int | None = None, groups: Sequence[str] | None = None
) -> dict[str, float]:
    scores = similarity(image, text, branch)
    ids = group_ids(groups) if groups is not None else torch.arange(scores.shape[0])
    same = ids[:, None] == ids[None, :]
    out: dict[str, float] = {}
    for name, ranks in (("i2t", _ranks(scores, same)), ("t2i", _ranks(scores.T, same))):
        for k in (1, 5, 10):
            out[f"{name}_R{k}"] = (ranks < k).float().mean().item()
        out[f"{name}_mean_rank"] = ranks.float().mean().item() + 1
    return out
