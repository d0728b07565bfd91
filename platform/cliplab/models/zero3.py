"""ZeRO-3 construction: build a model whose parameters are partitioned as they are created, and write to them.

Under `deepspeed.zero.Init` every module's own parameters are partitioned across the ranks as soon as its
`__init__` returns, so no rank ever holds the whole fp32 model. Two things then need the full tensor back:
a parent module that re-initialises its children's weights afterwards (open_clip's `init_parameters`) and
copying pretrained or shared weights in. Both go through `gathered`, one parameter at a time, so the peak
is one full parameter on top of this rank's partition. Without ZeRO-3 every helper here is a no-op, and
deepspeed is imported only when a partitioned model is actually built.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

# torch.nn.init's in-place initialisers: a call on a partitioned parameter would fill its empty placeholder
INITIALISERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a ZeRO-3 parameter whose full data is not on this rank right now."""
    status = getattr(tensor, "ds_status", None)
    return status is not None and status.name == "NOT_AVAILABLE"


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's real shape (a partitioned one's `shape` is its empty placeholder's)."""
    return getattr(param, "ds_shape", param.shape)


def gathered(params: Iterable[torch.Tensor]):
    """A context holding the full `params` on every rank; rank 0's values are kept on exit (no-op unpartitioned)."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@contextmanager
def partitioned_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Modules built inside are partitioned at once (`deepspeed.zero.Init`), initialised as if built eagerly.

    torch.nn.init's initialisers gather a partitioned argument first: every rank draws the same full
    tensor from the same seeded generator, in the eager build's order, so the weights are the eager ones.
    They are swapped wherever they are bound, since modules import them by name (`nn.MultiheadAttention`
    re-initialises its `out_proj` through `from torch.nn.init import constant_`).
    """
    import deepspeed

    originals = {getattr(nn.init, name): _on_gathered(getattr(nn.init, name)) for name in INITIALISERS}
    bindings = [
        (module, name, fn)
        for module in list(sys.modules.values())
        for name in INITIALISERS
        if (fn := getattr(module, name, None)) in originals
    ]
    for module, name, fn in bindings:
        setattr(module, name, originals[fn])
    deepspeed.init_distributed(verbose=False)  # the config's batch check needs the world size (wraps torch's group)
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        for module, name, fn in bindings:
            setattr(module, name, fn)


def _on_gathered(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def initialise(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with gathered([tensor]):
            return fn(tensor, *args, **kwargs)

    return initialise


def load_partitioned(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (already checked to fit `model`) into a partitioned model, one gathered parameter at a time.

    Collective: every rank calls it with the same state (parameters keep rank 0's copy, buffers their own).
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                with gathered([param]):
                    param.copy_(state[name].view(full_shape(param)))
        for name, buffer in model.named_buffers():
            if name in state:
                buffer.copy_(state[name])
