"""A run's export as a registered MLflow model version: a pyfunc over the open_clip checkpoint and model config.

The model version's artifacts are the export itself (`open_clip_model.pt`, `cliplab_model.json` and, for inline
models, the open_clip config JSON), so it can be promoted in the registry and loaded back either way:
`mlflow.pyfunc.load_model("models:/NAME/VERSION")` embeds texts and images (cliplab must be importable where it
loads), and `cliplab.models.factory.load_exported(DIR)` rebuilds the torch model from the downloaded
`artifacts/export` folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import mlflow

EXPORT_ARTIFACT = "export"


class OpenClipEmbedder(mlflow.pyfunc.PythonModel):
    """Unit-norm embeddings of a DataFrame's `text` column (strings) or `image` column (encoded image bytes).

    A multi-branch image tower gives one embedding per branch, (N, M, D); everything else gives (N, D).
    """

    def load_context(self, context: Any) -> None:
        from cliplab.data.tokenize import build_tokenizer
        from cliplab.models.factory import load_exported

        self.model, self.preprocess, cfg = load_exported(context.artifacts[EXPORT_ARTIFACT])
        self.model.eval()
        self.tokenizer = build_tokenizer(cfg)

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads type hints as a schema
        import torch

        with torch.no_grad():
            if "text" in model_input:
                tokens = self.tokenizer(list(model_input["text"]))
                return self.model.encode_text(tokens, normalize=True).float().numpy()
            if "image" in model_input:
                return self.model.encode_image(self._pixels(model_input["image"]), normalize=True).float().numpy()
        raise ValueError("model input needs a 'text' column (strings) or an 'image' column (encoded image bytes)")

    def _pixels(self, images: Any) -> Any:
        import torch
        from PIL import Image

        from cliplab.data.augment import eval_view

        p = self.preprocess
        views = [eval_view(Image.open(io.BytesIO(raw)).convert("RGB"), p.image_size, p.mean, p.std) for raw in images]
        return torch.stack(views)


def _requirements() -> list[str]:
    """What a loader needs installed (pinned to what trained the model)."""
    return [f"{name}=={metadata.version(name)}" for name in ("cliplab", "open_clip_torch", "torch", "pillow")]


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` for a while; it mirrors its URI into MLFLOW_TRACKING_URI, which every
    later run in this process would then read, so the caller's environment is put back afterwards."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def register_export(tracking_uri: str, run_id: str, export_dir: str, model_name: str) -> int:
    """Log the export at `export_dir` (local or any fsspec URL) as the run's MLflow model; returns its version."""
    from mlflow.models import Model

    from cliplab import storage

    fs, root = storage.filesystem(export_dir)
    with tempfile.TemporaryDirectory() as tmp, using_tracking_uri(tracking_uri):
        local = f"{tmp}/{EXPORT_ARTIFACT}"
        storage.retrying(lambda: fs.get(f"{root.rstrip('/')}/", local, recursive=True), "downloading", export_dir)
        info = Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=OpenClipEmbedder(),
            artifacts={EXPORT_ARTIFACT: local},
            registered_model_name=model_name,
            pip_requirements=_requirements(),
        )
    return int(info.registered_model_version)
