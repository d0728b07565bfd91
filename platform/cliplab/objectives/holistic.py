"""Holistic CLIP's multi-to-multi (M2M) contrastive loss (holistic.md "Losses", "Pseudo-code").

Image features V are (b, M, D) (M branches; a single-branch model counts as M = 1), caption features
U are (b, C, D) (C caption slots). Caption slot c is contrasted with one branch per image-caption pair:

    z^c_{j,k} = s * v_{sigma(j,c), j}^T u_{c,k}                                  (eq. 1)
    L_I2T = -(1/(C N)) sum_c sum_j log softmax_k(z^c_{j,.})_j                     (eq. 2)
    L_T2I = -(1/(C N)) sum_c sum_k log softmax_j(s * u_{c,k}^T v_{sigma(k,c), j})_k  (eq. 3)
    L_M2M = (L_I2T + L_T2I) / 2                                                   (eq. 4)

with N the global batch (local rows against features gathered with gradient, as for CLIP).
sigma(j, c) = c (fixed by caption order) when branch c exists and the sample has its own caption for
slot c; otherwise free matching (eq. 5): the branch most similar to the pair's own caption,
argmax_m v_{m,j}^T u_{c,j}, also used for that caption's T2I row. `assignment: free` matches every slot
freely. With M = C = 1 this is exactly CLIP's loss; with M = 1 and C > 1 it is the spec's O2M baseline.

Spec choices followed: fixed assignment by default (ambiguity 1; no Hungarian matching), one shared
temperature (4), the diversity hinge (6) behind `diversity`, off by default (3), computed on the local
batch; the dead 0.01-weighted cross-slot term (7) is not implemented.

Logged terms: `loss_i2t`, `loss_t2i`, `loss_branch{c}` (slot c's term, trained by branch c under fixed
assignment), `own_caption_frac` (share of pairs with their own caption), `loss_div` when on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from cliplab.objectives.distributed import gather_with_grad, global_labels
from cliplab.objectives.registry import ObjectiveSpec

if TYPE_CHECKING:
    from cliplab.config import Experiment


class HolisticParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    assignment: Literal["fixed", "free"] = Field("fixed", description="branch of caption slot c: c, or argmax")
    diversity: bool = Field(False, description="add the branch-diversity hinge (eq. 6; code-only, off in the spec)")
    diversity_margin: float = Field(0.7, ge=-1, le=1, description="hinge margin on mean off-diagonal cosine")
    diversity_weight: float = Field(1.0, ge=0, description="weight of the hinge when on")


def branch_choice(img: torch.Tensor, own_txt: torch.Tensor, fixed: torch.Tensor, slot: int) -> torch.Tensor:
    """sigma(j, c) for the local pairs: `slot` where `fixed`, else the argmax branch (eq. 5). (b,) long."""
    free = torch.einsum("bmd,bd->bm", img.detach(), own_txt.detach()).argmax(dim=1)
    return torch.where(fixed, torch.full_like(free, slot), free)


def m2m_loss(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, fixed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_M2M, L_I2T, L_T2I, per-slot losses (C,)) of local unit-norm features against the global batch.

    img (b, M, D), txt (b, C, D), fixed (b, C) bool: whether pair (j, c) uses branch c.
    """
    all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
    b, branches, _ = img.shape
    labels = global_labels(b, img.device)
    rows = torch.arange(b, device=img.device)
    i2t, t2i = [], []
    for c in range(txt.shape[1]):
        use_fixed = fixed[:, c] if c < branches else torch.zeros_like(fixed[:, c])
        pick = branch_choice(img, txt[:, c], use_fixed, c)
        i2t.append(F.cross_entropy(scale * img[rows, pick] @ all_txt[:, c].T, labels))
        t2i.append(F.cross_entropy(scale * torch.einsum("kd,nkd->kn", txt[:, c], all_img[:, pick]), labels))
    i2t_c, t2i_c = torch.stack(i2t), torch.stack(t2i)
    per_slot = (i2t_c + t2i_c) / 2
    return per_slot.mean(), i2t_c.mean(), t2i_c.mean(), per_slot


def diversity_hinge(img: torch.Tensor, margin: float) -> torch.Tensor:
    """max(0, mean_{a != b} C_ab - margin), C = mean_j V_j V_j^T over the local batch (eq. 6)."""
    branches = img.shape[1]
    if branches == 1:
        return img.new_zeros(())
    gram = torch.einsum("bmd,bnd->mn", img, img) / img.shape[0]
    off = gram.sum() - gram.diagonal().sum()
    return F.relu(off / (branches * (branches - 1)) - margin)


class HolisticObjective:
    """M image embeddings per image against the image's C caption slots, slot by slot across the global batch."""

    def __init__(self, params: HolisticParams):
        self.params = params

    def embed(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        texts = batch["texts"]
        out = model(image=batch["image"], text=texts.flatten(0, 1))
        img = out["image_features"]
        return {
            "image": img if img.ndim == 3 else img[:, None],
            "text": out["text_features"].unflatten(0, texts.shape[:2]),
        }, out["logit_scale"]

    def loss(
        self, feats: dict[str, torch.Tensor], logit_scale: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        fixed = batch["caption_own"].to(feats["image"].device)
        if self.params.assignment == "free":
            fixed = torch.zeros_like(fixed)
        total, i2t, t2i, per_slot = m2m_loss(feats["image"], feats["text"], logit_scale, fixed)
        terms = {
            "loss_i2t": i2t.detach(),
            "loss_t2i": t2i.detach(),
            **{f"loss_branch{c}": v.detach() for c, v in enumerate(per_slot)},
            "own_caption_frac": batch["caption_own"].float().mean(),
        }
        if self.params.diversity:
            div = diversity_hinge(feats["image"], self.params.diversity_margin)
            total = total + self.params.diversity_weight * div
            terms["loss_div"] = div.detach()
        return total, terms

    def after_step(self, engine: Any) -> None:
        """The M2M loss keeps no state between steps."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


def build_holistic(params: HolisticParams) -> HolisticObjective:
    """The M2M objective from its validated parameters."""
    return HolisticObjective(params)


def check_holistic(params: HolisticParams, exp: Experiment) -> None:
    """Under fixed assignment branch c trains on caption slot c only: a branch past the last slot never trains."""
    branches = exp.model.branches.count if exp.model.branches else 1
    slots = len(exp.data.captions.slots)
    if branches > slots and params.assignment == "fixed":
        raise ValueError(
            f"model.branches.count {branches} > {slots} data.captions.slots: branches without "
            "a caption slot never train under objective.assignment fixed; add slots or use free"
        )


def holistic_terms(params: HolisticParams, exp: Experiment) -> tuple[str, ...]:
    """The logged terms: directions, one per caption slot, the own-caption share, the hinge when on."""
    slots = len(exp.data.captions.slots)
    return (
        "loss_i2t",
        "loss_t2i",
        *(f"loss_branch{c}" for c in range(slots)),
        "own_caption_frac",
        *(("loss_div",) if params.diversity else ()),
    )


SPEC = ObjectiveSpec(
    name="holistic",
    params=HolisticParams,
    build=build_holistic,
    batch_fields=frozenset({"image", "texts", "caption_own"}),
    terms=holistic_terms,
    check=check_holistic,
)
