"""Which batch fields the training reader (`data/pipeline.py`) emits for a data config, and what enables each.

Objectives declare the fields they read (`ObjectiveSpec.batch_fields`); `validate_tree` compares them
with this table so a missing field is a config error naming the setting that turns it on, before any
worker starts, instead of a KeyError in the first step.
"""

from __future__ import annotations

from collections.abc import Callable

from cliplab.config import DataConfig

ALWAYS = frozenset({"image", "text", "crop_box", "flip", "key", "json"})

OPTIONAL: dict[str, tuple[str, Callable[[DataConfig], bool]]] = {
    "texts": ("data.captions", lambda d: d.captions is not None),
    "caption_own": ("data.captions", lambda d: d.captions is not None),
    "views": ("data.views.count >= 1", lambda d: d.views.count > 0),
    "view_boxes": ("data.views.count >= 1", lambda d: d.views.count > 0),
    "view_flip": ("data.views.count >= 1", lambda d: d.views.count > 0),
    "view_jitter": ("data.views.count >= 1", lambda d: d.views.count > 0),
}


def missing_fields(needed: frozenset[str], data: DataConfig) -> dict[str, list[str]]:
    """Fields in `needed` the reader would not emit, grouped by the setting that enables them."""
    out: dict[str, list[str]] = {}
    for name in sorted(needed - ALWAYS):
        setting, enabled = OPTIONAL.get(name, (f"a reader that emits {name!r}", lambda d: False))
        if not enabled(data):
            out.setdefault(setting, []).append(name)
    return out


def emitted(data: DataConfig, needed: frozenset[str] | None = None) -> frozenset[str]:
    """The fields the reader sends: all it makes for `data`, or those `needed` (plus `image`: throughput counts it)."""
    made = ALWAYS | {name for name, (_, enabled) in OPTIONAL.items() if enabled(data)}
    return made if needed is None else made & (needed | {"image"})
