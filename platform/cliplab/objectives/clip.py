"""CLIP's symmetric InfoNCE with a learnable temperature (methods/README.md conventions; mcd.md eq. (1)).

    L = 1/(2N) * sum_i [ CE(s z_i U^T, i) + CE(s u_i Z^T, i) ],   s = exp(logit_scale)

computed in open_clip's local-loss form: each worker's b rows against the N = W*b gathered columns,
gathered with gradient. The mean over local rows, averaged over workers by data parallelism, is the
loss of the global batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from cliplab.objectives.distributed import gather_with_grad, global_labels
from cliplab.objectives.registry import ObjectiveSpec


class ClipParams(BaseModel):
    """CLIP has no parameters beyond the model's temperature."""

    model_config = ConfigDict(extra="forbid")


def contrastive_loss(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of local unit-norm features against the global batch: (total, i2t, t2i)."""
    all_img = gather_with_grad(img)
    all_txt = gather_with_grad(txt)
    labels = global_labels(img.shape[0], img.device)
    i2t = F.cross_entropy(scale * img @ all_txt.T, labels)
    t2i = F.cross_entropy(scale * txt @ all_img.T, labels)
    return (i2t + t2i) / 2, i2t, t2i


class ClipObjective:
    """Image and caption embeddings from one open_clip forward, contrasted across the global batch."""

    def embed(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        out = model(image=batch["image"], text=batch["text"])
        return {"image": out["image_features"], "text": out["text_features"]}, out["logit_scale"]

    def loss(
        self, feats: dict[str, torch.Tensor], logit_scale: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, i2t, t2i = contrastive_loss(feats["image"], feats["text"], logit_scale)
        return total, {"loss_i2t": i2t.detach(), "loss_t2i": t2i.detach()}

    def after_step(self, engine: Any) -> None:
        """CLIP keeps no state between steps."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


def build_clip(params: ClipParams) -> ClipObjective:
    """CLIP from its (empty) parameters."""
    return ClipObjective()


SPEC = ObjectiveSpec(
    name="clip",
    params=ClipParams,
    build=build_clip,
    batch_fields=frozenset({"image", "text"}),
    terms=lambda params, exp: ("loss_i2t", "loss_t2i"),
)
