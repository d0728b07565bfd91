"""Multi-branch image towers over open_clip's VisionTransformer (holistic.md "Multi-branch image encoders").

Both designs adopt the ViT's own submodules and parameters under their original names, so the state-dict
keys of every shared part are those of a plain open_clip model: a plain checkpoint loads into them, and
only the branch-specific parameters are new. The tower returns (B, M, D); open_clip's `encode_image`
normalises along the last dimension, so every branch embedding is unit-norm.

Initialisation of the new parameters: from scratch as the spec says (CLS vectors and positions
W^-1/2 N(0, I); extra c_proj like open_clip's c_proj init), so the M branches differ from the start. When
a plain checkpoint is loaded (`init_from_shared`), the new parameters copy their pretrained counterparts,
so every branch starts as the pretrained embedding and the branches separate as they learn their slots.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from cliplab.config import BranchesConfig
from cliplab.errors import ConfigError
from cliplab.models.zero3 import full_shape, gathered


def _check_vit(vit: nn.Module) -> VisionTransformer:
    """Refuse towers the branch designs are not defined for, naming what differs."""
    if not isinstance(vit, VisionTransformer):
        raise ConfigError(
            f"model.branches needs a ViT vision tower; this model's is {type(vit).__name__} "
            "(vision_cfg.layers must be an int, not a ResNet layer list)"
        )
    unsupported = {
        "attentional pooling": vit.attn_pool is not None,
        f"pool_type {vit.pool_type!r}": vit.pool_type != "tok",
        "final_ln_after_pool": vit.final_ln_after_pool,
        "patch_dropout": not isinstance(vit.patch_dropout, nn.Identity),
        "output_tokens": vit.output_tokens,
        "a projection-free head": vit.proj is None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(
            f"model.branches: the vision tower uses {', '.join(bad)}; branches are defined for "
            "open_clip's standard class-token ViT"
        )
    if not all(isinstance(b, ResidualAttentionBlock) for b in vit.transformer.resblocks):
        raise ConfigError("model.branches: the vision tower's blocks are not open_clip ResidualAttentionBlocks")
    return vit


def _adopt(module: nn.Module, vit: VisionTransformer) -> None:
    """Register the ViT's children and direct parameters on `module` under the same names."""
    for name, child in vit.named_children():
        module.add_module(name, child)
    for name, param in vit.named_parameters(recurse=False):
        module.register_parameter(name, param)
    for name in ("image_size", "patch_size", "grid_size", "output_dim", "preprocess_cfg"):  # read by open_clip
        if hasattr(vit, name):
            setattr(module, name, getattr(vit, name))


def _patch_tokens(tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, N_p, W) patch embeddings with their positional embeddings (rows 1.. of the ViT's table)."""
    x = tower.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    return x + tower.positional_embedding[1:].to(x.dtype)


class _BranchTower(nn.Module):
    """What both designs share: activation checkpointing switched through the adopted transformer, as open_clip does."""

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """open_clip's CLIP.set_grad_checkpointing calls this on its vision tower."""
        self.transformer.grad_checkpointing = enable

    def _maybe_checkpointed(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """`fn(*args)`, recomputed in backward when checkpointing is on (non-reentrant, like open_clip)."""
        if self.transformer.grad_checkpointing:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


class MultiClsVision(_BranchTower):
    """Psi_CLS: M class tokens with their own positions; class token a never attends to class token b != a.

    Patches attend to every token, including all class tokens (holistic.md ambiguity 8: reproduced as
    the code does). Class token 0 and its position are the ViT's own (`class_embedding`,
    `positional_embedding[0]`); tokens 1..M-1 are `extra_class_embedding` / `extra_positional_embedding`.
    """

    def __init__(self, vit: VisionTransformer, count: int):
        super().__init__()
        _adopt(self, _check_vit(vit))
        self.count = count
        width = full_shape(vit.class_embedding)[0]
        self.extra_class_embedding = nn.Parameter(width**-0.5 * torch.randn(count - 1, width))
        self.extra_positional_embedding = nn.Parameter(width**-0.5 * torch.randn(count - 1, width))

    def init_from_shared(self) -> None:
        """After loading a plain checkpoint: every class token starts as the pretrained one."""
        shared = [self.class_embedding, self.positional_embedding]
        with torch.no_grad(), gathered([self.extra_class_embedding, self.extra_positional_embedding, *shared]):
            self.extra_class_embedding.copy_(self.class_embedding.expand_as(self.extra_class_embedding))
            self.extra_positional_embedding.copy_(self.positional_embedding[:1].expand_as(self.extra_class_embedding))

    def cls_mask(self, tokens: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive (T, T) attention mask: -inf between different class tokens, 0 elsewhere."""
        mask = torch.zeros(tokens, tokens, dtype=dtype, device=device)
        m = self.count
        mask[:m, :m] = float("-inf")
        mask[:m, :m].fill_diagonal_(0)
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = _patch_tokens(self, x)
        cls = torch.cat([self.class_embedding[None], self.extra_class_embedding])
        pos = torch.cat([self.positional_embedding[:1], self.extra_positional_embedding])
        cls = (cls + pos).to(patches.dtype).expand(patches.shape[0], -1, -1)
        x = self.ln_pre(torch.cat([cls, patches], dim=1))
        x = self.transformer(x, attn_mask=self.cls_mask(x.shape[1], x.dtype, x.device))
        return self.ln_post(x[:, : self.count]) @ self.proj


class ParallelMlpVision(_BranchTower):
    """Psi_MLP: in the last `blocks` blocks the MLP's c_proj is replicated M times; attention and c_fc are shared.

    At the first modified block the token stream forks into M streams (batch B*M from then on), stream m
    using branch m's c_proj in every modified block. Branch 0 is the block's own `mlp.c_proj`; branches
    1..M-1 of modified block k are `branch_proj[k][m-1]`.
    """

    def __init__(self, vit: VisionTransformer, count: int, blocks: int):
        super().__init__()
        _adopt(self, _check_vit(vit))
        layers = len(vit.transformer.resblocks)
        if blocks > layers:
            raise ConfigError(f"model.branches.mlp_blocks {blocks} > the vision tower's {layers} blocks")
        self.count, self.first = count, layers - blocks
        width = full_shape(vit.class_embedding)[0]
        std = width**-0.5 * (2 * layers) ** -0.5  # open_clip's init of c_proj
        self.branch_proj = nn.ModuleList()
        for block in vit.transformer.resblocks[self.first :]:
            c_proj = block.mlp.c_proj
            extra = nn.ModuleList(nn.Linear(c_proj.in_features, c_proj.out_features) for _ in range(count - 1))
            for linear in extra:
                nn.init.normal_(linear.weight, std=std)
                nn.init.zeros_(linear.bias)
            self.branch_proj.append(extra)

    def init_from_shared(self) -> None:
        """After loading a plain checkpoint: every branch's c_proj starts as the pretrained one."""
        with torch.no_grad():
            for block, extra in zip(self.transformer.resblocks[self.first :], self.branch_proj, strict=True):
                source = block.mlp.c_proj
                for linear in extra:
                    with gathered([linear.weight, linear.bias, source.weight, source.bias]):
                        linear.weight.copy_(source.weight)
                        linear.bias.copy_(source.bias)

    def compile_branch_blocks(self, **kwargs: Any) -> None:
        """Regional compile of the modified blocks, which run outside their own `forward` (plain ones compile there)."""
        self._branch_block = torch.compile(self._branch_block, **kwargs)

    def _branch_block(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Modified block k: shared attention and c_fc, then stream m's own c_proj (k == 0 forks B into B*M)."""
        block, m = self.transformer.resblocks[self.first + k], self.count
        x = x + block.ls_1(block.attention(block.ln_1(x)))
        hidden = block.mlp.gelu(block.mlp.c_fc(block.ln_2(x)))
        projections = [block.mlp.c_proj, *self.branch_proj[k]]
        if k == 0:  # fork: each stream adds its own projection of the shared hidden state
            return torch.stack([x + block.ls_2(p(hidden)) for p in projections], dim=1).flatten(0, 1)
        hidden = hidden.unflatten(0, (x.shape[0] // m, m))
        update = torch.stack([p(hidden[:, i]) for i, p in enumerate(projections)], dim=1)
        return x + block.ls_2(update.flatten(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = _patch_tokens(self, x)
        cls = (self.class_embedding + self.positional_embedding[0]).to(patches.dtype)
        x = self.ln_pre(torch.cat([cls.expand(patches.shape[0], 1, -1), patches], dim=1))
        batch = x.shape[0]
        for block in self.transformer.resblocks[: self.first]:
            x = self._maybe_checkpointed(block, x)
        for k in range(len(self.branch_proj)):
            x = self._maybe_checkpointed(self._branch_block, k, x)
        pooled = x.unflatten(0, (batch, self.count))[:, :, 0]
        return self.ln_post(pooled) @ self.proj


def install_branches(model: nn.Module, cfg: BranchesConfig) -> None:
    """Replace `model.visual` by the multi-branch tower `cfg` describes (shared weights kept)."""
    if cfg.design == "cls":
        model.visual = MultiClsVision(model.visual, cfg.count)
    else:
        model.visual = ParallelMlpVision(model.visual, cfg.count, cfg.mlp_blocks)


BRANCH_PARAMS = ("visual.extra_class_embedding", "visual.extra_positional_embedding", "visual.branch_proj.")


def is_branch_param(name: str) -> bool:
    """Whether a state-dict key belongs to the branches only (absent from a plain open_clip checkpoint)."""
    return name.startswith(BRANCH_PARAMS)
