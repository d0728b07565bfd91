"""Build open_clip models by name or inline config, optionally initialised from a local checkpoint.

The logit scale is created with shape [1] (`nonscalar_logit_scale=True`): deepspeed 0.19.8 refuses 0-dim
parameters at ZeRO 0-2, and open_clip's `load_checkpoint` converts between [1] and [] on load, so
exported checkpoints still load into plain open_clip models.

With `model.branches` the image tower becomes multi-branch (models/branches.py); a plain open_clip
checkpoint still loads into its shared parts, and the branch parameters start from their pretrained
counterparts.

Built for ZeRO-3 (`partition`), the parameters are partitioned as the modules are created (models/zero3.py);
a checkpoint is then checked and converted on a meta-device twin and copied in one parameter at a time.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg
from pydantic import TypeAdapter, ValidationError

from cliplab.config import ModelConfig
from cliplab.errors import ConfigError
from cliplab.models.branches import install_branches, is_branch_param
from cliplab.models.zero3 import is_partitioned, load_partitioned, partitioned_construction

CHECKPOINT_FILE = "open_clip_model.pt"  # what an export holds: open_clip's checkpoint ...
MODEL_FILE = "cliplab_model.json"  # ... and the model section that rebuilds its architecture


@dataclass(frozen=True)
class Preprocess:
    """What the data pipeline needs from the model: input size and normalisation."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def build_model(cfg: ModelConfig, partition: dict[str, Any] | None = None) -> tuple[torch.nn.Module, Preprocess]:
    """An open_clip CLIP model returning dict outputs, and its preprocessing constants.

    `partition`: a ZeRO-3 DeepSpeed config; the model is then built partitioned across the ranks (collective).
    """
    with partitioned_construction(partition) if partition is not None else nullcontext():
        model = _create(cfg)
    if cfg.pretrained:
        _load_pretrained(model, cfg)
    pre = {**asdict(PreprocessCfg()), **open_clip.get_model_preprocess_cfg(model)}
    size = pre["size"]
    return model, Preprocess(
        image_size=int(size if isinstance(size, int) else size[0]),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
    )


def _create(cfg: ModelConfig) -> torch.nn.Module:
    """The architecture `cfg` names, with its branches, randomly initialised."""
    kwargs = {"nonscalar_logit_scale": True, "init_logit_scale": cfg.init_logit_scale}
    if cfg.name is not None:
        _check_name(cfg.name)
        model = open_clip.create_model(cfg.name, output_dict=True, **kwargs)
    else:
        try:
            model = open_clip.model.CLIP(**cfg.config, output_dict=True, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"model.config: not a valid open_clip CLIP config ({exc})") from None
    if cfg.branches is not None:
        install_branches(model, cfg.branches)
    return model


def _check_name(name: str) -> None:
    if name not in open_clip.list_models():
        raise ConfigError(f"model.name: {name!r} is not an open_clip model (see open_clip.list_models())")


def check_model(cfg: ModelConfig) -> None:
    """Refuse, on the driver and without allocating weights, a model section the workers could not build.

    An inline `model.config` is checked field by field against open_clip's CLIPVisionCfg / CLIPTextCfg
    (JSON types: "64" is no int), then built on the meta device, which catches what the types allow but
    open_clip refuses (e.g. a width that is no multiple of head_width).
    """
    if cfg.name is not None:
        _check_name(cfg.name)
        return
    embed_dim = cfg.config["embed_dim"]
    problems = [] if type(embed_dim) is int else [f"  model.config.embed_dim: expected int, got {embed_dim!r}"]
    problems += _field_problems("vision_cfg", cfg.config["vision_cfg"], open_clip.model.CLIPVisionCfg)
    problems += _field_problems("text_cfg", cfg.config["text_cfg"], open_clip.model.CLIPTextCfg)
    if problems:
        raise ConfigError("model.config does not fit open_clip's model config:\n" + "\n".join(problems))
    try:
        with torch.device("meta"):
            _create(cfg)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"model.config: open_clip cannot build this model ({type(exc).__name__}: {exc})") from None


def _field_problems(section: str, values: Any, schema: type) -> list[str]:
    """One line per unknown key or wrongly typed value of an open_clip config dataclass."""
    where = f"  model.config.{section}"
    if not isinstance(values, dict):
        return [f"{where}: expected a mapping of {schema.__name__} fields, got {values!r}"]
    fields = {f.name: f.type for f in dataclasses.fields(schema)}
    lines = [
        f"{where}.{key}: unknown key (not a field of open_clip's {schema.__name__})"
        for key in values
        if key not in fields
    ]
    known = {k: v for k, v in values.items() if k in fields and v is not None}  # open_clip's configs use null freely
    try:
        TypeAdapter(schema).validate_json(json.dumps(known, default=str), strict=True)
    except ValidationError as exc:
        for key in dict.fromkeys(str(e["loc"][0]) for e in exc.errors() if e["loc"]):
            lines.append(f"{where}.{key}: expected {_type_name(fields[key])}, got {known[key]!r}")
    return lines


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _load_pretrained(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Load a checkpoint; only a multi-branch model may lack keys, and only its branch parameters."""
    try:
        if any(is_partitioned(p) for p in model.parameters()):
            result = _load_partitioned_checkpoint(model, cfg)
        else:
            result = open_clip.load_checkpoint(model, cfg.pretrained, strict=cfg.branches is None)
    except FileNotFoundError:
        raise ConfigError(f"model.pretrained: no checkpoint at {cfg.pretrained}") from None
    except RuntimeError as exc:
        raise ConfigError(
            f"model.pretrained: {cfg.pretrained} does not fit model {cfg.name or 'config'}: {str(exc).splitlines()[0]}"
        ) from None
    if cfg.branches is None:
        return
    missing = [k for k in result.missing_keys if not is_branch_param(k)]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"model.pretrained: {cfg.pretrained} does not fit the model: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )
    if result.missing_keys:  # a plain checkpoint: branches start from the shared weights
        model.visual.init_from_shared()


def _load_partitioned_checkpoint(model: torch.nn.Module, cfg: ModelConfig) -> Any:
    """open_clip's checkpoint conversion and fit check on a meta-device twin, then the copy into `model`."""
    with torch.device("meta"):
        twin = _create(cfg)
    state: dict[str, torch.Tensor] = {}
    twin.register_load_state_dict_pre_hook(lambda module, state_dict, *_: state.update(state_dict))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
        result = open_clip.load_checkpoint(twin, cfg.pretrained, strict=cfg.branches is None)
    load_partitioned(model, state)
    return result


def load_exported(export_dir: str) -> tuple[torch.nn.Module, Preprocess, ModelConfig]:
    """Rebuild a model exported by a cliplab run (local folder or any fsspec URL such as s3://)."""
    import tempfile

    import fsspec

    fs, root = fsspec.core.url_to_fs(export_dir)
    model_file, checkpoint_file = f"{root.rstrip('/')}/{MODEL_FILE}", f"{root.rstrip('/')}/{CHECKPOINT_FILE}"
    for path in (model_file, checkpoint_file):
        if not fs.exists(path):
            raise ConfigError(f"{export_dir}: not a cliplab export ({path.rsplit('/', 1)[1]} is missing)")
    cfg = ModelConfig.model_validate_json(fs.cat_file(model_file))
    with tempfile.TemporaryDirectory() as tmp:
        local = f"{tmp}/{CHECKPOINT_FILE}"
        fs.get_file(checkpoint_file, local)
        model, pre = build_model(cfg.model_copy(update={"pretrained": local}))
    return model, pre, cfg
