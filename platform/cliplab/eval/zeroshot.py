"""Zero-shot classification: class prompts -> averaged text embeddings -> argmax over classes (OpenAI recipe)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cliplab.eval.scoring import similarity


@torch.no_grad()
def class_embeddings(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
) -> torch.Tensor:
    """(C, D): each class's template embeddings, normalised, averaged and renormalised."""
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = model.encode_text(tokenizer(prompts).to(device), normalize=True).float().cpu()
    emb = F.normalize(emb, dim=-1).view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


def lookup(meta: dict[str, Any], dotted: str) -> Any:
    """`labels.colour` -> meta["labels"]["colour"]; None when any part is missing."""
    node: Any = meta
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def zeroshot_accuracy(
    image: torch.Tensor,
    classes: torch.Tensor,
    labels: Sequence[Any],
    classnames: Sequence[str],
    branch: int | None = None,
) -> dict[str, float]:
    """top-1 (and top-5 when C > 5) accuracy over samples whose label is a known class; others are counted."""
    index = {c: i for i, c in enumerate(classnames)}
    keep = [i for i, lab in enumerate(labels) if lab in index]
    out: dict[str, float] = {"n_excluded": float(len(labels) - len(keep)), "n": float(len(keep))}
    if not keep:
        return out
    target = torch.tensor([index[labels[i]] for i in keep])
    scores = similarity(image[keep], classes, branch)
    out["top1"] = (scores.argmax(1) == target).float().mean().item()
    if len(classnames) > 5:
        out["top5"] = (scores.topk(5, dim=1).indices == target[:, None]).any(1).float().mean().item()
    return out
