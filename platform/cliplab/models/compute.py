"""Compute switches applied to a built model: activation checkpointing and regional (per-block) torch.compile.

Attention needs no switch: open_clip 3.3's default block (`ResidualAttentionBlock`) calls
`nn.MultiheadAttention` with `need_weights=False`, and torch's `multi_head_attention_forward` then computes
attention with `F.scaled_dot_product_attention` (the native fast path, taken in inference, is fused too); the
custom block's `Attention` sets `use_fsdpa` whenever torch has SDPA. On GPU, SDPA picks its kernel by
itself: the text tower's causal mask and the `cls` branch mask are explicit float masks, so those run the
memory-efficient kernel rather than flash attention.
"""

from __future__ import annotations

from typing import Any

from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
from torch import nn

from cliplab.models.branches import ParallelMlpVision

BLOCKS = (ResidualAttentionBlock, CustomResidualAttentionBlock)


def set_grad_checkpointing(model: nn.Module, enable: bool) -> None:
    """Checkpoint every tower's blocks (open_clip's switch; cliplab's branch towers implement it too)."""
    model.set_grad_checkpointing(enable)


def compile_blocks(model: nn.Module, **kwargs: Any) -> int:
    """Compile every transformer block of every tower in place (names and state-dict keys unchanged).

    Returns how many blocks were compiled. The multi-branch MLP tower runs its last blocks outside their
    `forward`, so it compiles those itself.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, BLOCKS):
            module.compile(**kwargs)
            count += 1
        elif isinstance(module, ParallelMlpVision):
            module.compile_branch_blocks(**kwargs)
    return count
