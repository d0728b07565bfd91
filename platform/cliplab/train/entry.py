"""The function Ray Train runs on each worker, importable without torch, DeepSpeed or open_clip.

Ray pickles the training function by reference, so the driver imports the module that defines it. This one
imports the training loop (and with it torch, DeepSpeed, open_clip) only when a worker calls it: the driver
of `cliplab train` then never pays for those imports.
"""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """`cliplab.train.loop.train_loop_per_worker`, imported in the worker that runs it."""
    from cliplab.train.loop import train_loop_per_worker as run

    run(config)
