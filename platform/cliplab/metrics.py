"""What cliplab's metric names mean: which are held-out evaluations, training terms, headline numbers.

Progress lines, curves, sweep metric checks and comparison tables all ask this module, so a new metric
family is taught to cliplab in one place.
"""

from __future__ import annotations

HELD_OUT_PREFIXES = ("zeroshot/", "retrieval/", "probe/", "branch")
TRAIN_METRICS = ("loss", "samples_per_s")
COMPARE_HEADLINE = (
    "zeroshot/colour/top1",
    "zeroshot/shape/top1",
    "retrieval/i2t_R1",
    "retrieval/t2i_R1",
    "probe/spearman_scale",
    "probe/spearman_content",
    "samples_per_s",
    "loss",
)


def is_held_out(metric: str) -> bool:
    """Computed on held-out data (needs data.val_shards and an evaluation), not on training batches."""
    return metric.startswith(HELD_OUT_PREFIXES)


def is_loss_term(metric: str) -> bool:
    """The total training loss or one of an objective's logged `loss_*` terms."""
    return metric == "loss" or metric.startswith("loss_")


def is_train_metric(metric: str) -> bool:
    """Reported from training steps: throughput, the loss and its terms."""
    return metric in TRAIN_METRICS or is_loss_term(metric)


def is_headline(metric: str) -> bool:
    """Metrics worth a curve and a place in progress lines: loss terms aside, the top-level eval numbers."""
    if metric.startswith("zeroshot/"):
        return metric.endswith("/top1")
    if metric.startswith("retrieval/"):
        return metric.count("/") == 1 and metric.endswith("_R1")
    return metric.startswith("probe/spearman")


def is_slot_r1(metric: str) -> bool:
    """Retrieval R@1 of one caption slot (`retrieval/<slot>/i2t_R1`), shown in holistic comparisons."""
    return metric.startswith("retrieval/") and metric.count("/") == 2 and metric.endswith("_R1")


def compare_keys(have: set[str]) -> list[str]:
    """The comparison table's rows among `have`: COMPARE_HEADLINE in order, then R@1 per caption slot."""
    return [k for k in COMPARE_HEADLINE if k in have] + sorted(k for k in have if is_slot_r1(k))


def in_summary(metric: str) -> bool:
    """Held-out metrics for the end-of-run summary: top-level ones, only R@1 per caption slot, no per-branch ones."""
    if metric.startswith("retrieval/"):
        return metric.count("/") == 1 or metric.endswith("_R1")
    return metric.startswith(("zeroshot/", "chance/", "probe/")) and not metric.endswith(("/n", "/n_excluded"))
