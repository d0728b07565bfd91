"""Run every held-out evaluation and name the metrics as MLflow shows them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from cliplab.config import Experiment, ZeroShotTask
from cliplab.data.pipeline import eval_batches
from cliplab.eval.embed import embed_batches
from cliplab.eval.retrieval import retrieval_metrics
from cliplab.eval.zeroshot import class_embeddings, lookup, zeroshot_accuracy


def evaluate(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    batches: Iterable[dict[str, Any]],
    tasks: list[ZeroShotTask],
    device: torch.device,
    branch: int | None = None,
    slots: list[str] | None = None,
) -> dict[str, float]:
    """`zeroshot/<task>/top1`, `chance/<task>`, `retrieval/i2t_R1`, ..., `eval/n_samples` (collective).

    With caption `slots` (batches carry `texts`): retrieval per slot, `retrieval/<slot>/i2t_R1` ..., and for
    multi-branch models each branch's R@1 on each slot, `branch<m>/<slot>/i2t_R1` and `t2i_R1`.
    """
    data = embed_batches(model, batches, device)
    out: dict[str, float] = {"eval/n_samples": float(len(data["key"]))}
    for task in tasks:
        classes = class_embeddings(model, tokenizer, task.classnames, task.templates, device)
        labels = [lookup(meta, task.label_field) for meta in data["json"]]
        for name, value in zeroshot_accuracy(
            data["image"], classes, labels, task.classnames, branch, task.name
        ).items():
            out[f"zeroshot/{task.name}/{name}"] = value
        out[f"chance/{task.name}"] = 1.0 / len(task.classnames)
    main = retrieval_metrics(data["image"], data["text"], branch, data.get("caption"))
    out.update({f"retrieval/{k}": v for k, v in main.items()})
    if slots and data["texts"] is not None:
        out.update(slot_retrieval(data["image"], data["texts"], slots, branch, data.get("slot_texts")))
    return out


def slot_retrieval(
    image: torch.Tensor,
    texts: torch.Tensor,
    slots: list[str],
    branch: int | None = None,
    slot_texts: list[list[str]] | None = None,
) -> dict[str, float]:
    """Retrieval against each caption slot (fused over branches), and each branch's R@1 on each slot.

    `slot_texts` (each sample's caption per slot) make identical captions count as correct matches.
    """
    out: dict[str, float] = {}
    for c, slot in enumerate(slots):
        groups = [row[c] for row in slot_texts] if slot_texts is not None else None
        metrics = retrieval_metrics(image, texts[:, c], branch, groups)
        out.update({f"retrieval/{slot}/{k}": v for k, v in metrics.items() if "_R" in k})
        if image.ndim == 3:
            for m in range(image.shape[1]):
                per_branch = retrieval_metrics(image, texts[:, c], m, groups)
                out.update({f"branch{m}/{slot}/{k}": per_branch[k] for k in ("i2t_R1", "t2i_R1")})
    return out


def evaluate_experiment(
    model: Any, exp: Experiment, pre: Any, tokenizer: Callable, device: torch.device, rank: int = 0, world: int = 1
) -> dict[str, float]:
    """Every held-out evaluation the experiment asks for, over this rank's share of its val shards (collective)."""
    captions = exp.data.captions
    batches = eval_batches(
        exp.data.val_shards,
        exp.eval.batch_size,
        pre.image_size,
        pre.mean,
        pre.std,
        tokenizer,
        exp.data.caption_key,
        rank,
        world,
        exp.eval.max_samples,
        captions,
    )
    return evaluate(model, tokenizer, batches, exp.eval.zeroshot, device, slots=captions.slots if captions else None)
