"""Build open_clip models by name or inline config, optionally initialised from a local checkpoint.

The logit scale is created with shape [1] (`nonscalar_logit_scale=True`): deepspeed 0.19.8 refuses 0-dim
parameters at ZeRO 0-2, and open_clip's `load_checkpoint` converts between [1] and [] on load, so
exported checkpoints still load into plain open_clip models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import open_clip
import torch
from open_clip.transform import PreprocessCfg

from cliplab.config import ModelConfig
from cliplab.errors import ConfigError


@dataclass(frozen=True)
class Preprocess:
    """What the data pipeline needs from the model: input size and normalisation."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def build_model(cfg: ModelConfig) -> tuple[torch.nn.Module, Preprocess]:
    """An open_clip CLIP model returning dict outputs, and its preprocessing constants."""
    kwargs = {"nonscalar_logit_scale": True, "init_logit_scale": cfg.init_logit_scale}
    if cfg.name is not None:
        if cfg.name not in open_clip.list_models():
            raise ConfigError(f"model.name: {cfg.name!r} is not an open_clip model (see open_clip.list_models())")
        model = open_clip.create_model(cfg.name, output_dict=True, **kwargs)
    else:
        try:
            model = open_clip.model.CLIP(**cfg.config, output_dict=True, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"model.config: not a valid open_clip CLIP config ({exc})") from None
    if cfg.pretrained:
        try:
            open_clip.load_checkpoint(model, cfg.pretrained)
        except FileNotFoundError:
            raise ConfigError(f"model.pretrained: no checkpoint at {cfg.pretrained}") from None
    pre = {**asdict(PreprocessCfg()), **open_clip.get_model_preprocess_cfg(model)}
    size = pre["size"]
    return model, Preprocess(
        image_size=int(size if isinstance(size, int) else size[0]),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
    )
