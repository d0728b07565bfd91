"""Cross-worker gathers for contrastive losses (open_clip's local-loss scheme).

Each worker computes the logits of its local rows against the gathered global columns. The gather
keeps the autograd graph (`torch.distributed.nn.functional.all_gather`), so gradients of a worker's
loss reach the features of every other worker; after the data-parallel gradient average this equals
the gradient of the single-process loss on the concatenated global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every worker along dim 0, keeping the gradient path to each worker's rows."""
    _, size = world()
    if size == 1:
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every worker along dim 0 (equal shapes), without gradient."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def global_labels(local_n: int, device: torch.device) -> torch.Tensor:
    """Positions of this worker's rows inside the gathered global batch."""
    rank, _ = world()
    return torch.arange(local_n, device=device) + rank * local_n
