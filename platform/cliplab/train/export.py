"""Rank 0's export at the end of training: the open_clip checkpoint to storage, its URI tagged on the run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from cliplab import storage
from cliplab.config import Experiment
from cliplab.tracking.mlflow import MODEL_URI_TAG, RunLogger
from cliplab.train import checkpoint


def export_model(state: dict[str, torch.Tensor], exp: Experiment, tracker: RunLogger, export_dir: str) -> None:
    """Write the open_clip files to `export_dir` (local or s3://, under the retry policy) and tag the run with
    their location and open_clip model name; the driver registers the model from that tag."""
    fs, root = storage.filesystem(export_dir)
    fs.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"cliplab-export-{tracker.run_id}-") as local:
        files = checkpoint.export_open_clip(state, exp, Path(local))
        for path in files.values():
            target = f"{root.rstrip('/')}/{path.name}"
            storage.retrying(lambda p=path, t=target: fs.put_file(str(p), t), "exporting", f"{export_dir}/{path.name}")
    tracker.tags({MODEL_URI_TAG: export_dir, "cliplab.open_clip_name": checkpoint.export_model_name(exp)})
