"""Zero-shot classification: class prompts -> averaged text embeddings -> argmax over classes (OpenAI recipe)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cliplab.eval.scoring import similarity

log = logging.getLogger("cliplab.eval")
_warned: set[str] = set()  # tasks whose unusable labels were already warned about in this process


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


def class_targets(labels: Sequence[Any], classnames: Sequence[str], task: str = "zeroshot") -> list[int | None]:
    """Each label's class index: a class name, or an int indexing `classnames`; None where it is neither.

    Unusable labels are warned about once per task (count and examples): they are left out of the accuracy.
    """
    index = {c: i for i, c in enumerate(classnames)}
    targets = [_target(lab, index, len(classnames)) for lab in labels]
    bad = [lab for lab, t in zip(labels, targets, strict=True) if t is None]
    if bad and task not in _warned:
        _warned.add(task)
        log.warning(
            "zeroshot %s: %d of %d labels are neither one of the %d classnames nor a class index in "
            "[0, %d) and are left out (e.g. %s)",
            task,
            len(bad),
            len(labels),
            len(classnames),
            len(classnames),
            ", ".join(repr(b) for b in bad[:3]),
        )
    return targets


def _target(label: Any, index: dict[str, int], n: int) -> int | None:
    if isinstance(label, int) and not isinstance(label, bool):
        return label if 0 <= label < n else None
    return index.get(label) if isinstance(label, str) else None


def zeroshot_accuracy(
    image: torch.Tensor,
    classes: torch.Tensor,
    labels: Sequence[Any],
    classnames: Sequence[str],
    branch: int | None = None,
    task: str = "zeroshot",
) -> dict[str, float]:
    """top-1 (and top-5 when C > 5) accuracy over samples with a usable label (`class_targets`); others are counted."""
    targets = class_targets(labels, classnames, task)
    keep = [i for i, t in enumerate(targets) if t is not None]
    out: dict[str, float] = {"n_excluded": float(len(labels) - len(keep)), "n": float(len(keep))}
    if not keep:
        return out
    target = torch.tensor([targets[i] for i in keep])
    scores = similarity(image[keep], classes, branch)
    out["top1"] = (scores.argmax(1) == target).float().mean().item()
    if len(classnames) > 5:
        out["top5"] = (scores.topk(5, dim=1).indices == target[:, None]).any(1).float().mean().item()
    return out
