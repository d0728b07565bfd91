"""The experiment schema: one pydantic model describes a whole run; YAML files and `--set` overrides feed it.

Unknown keys and bad values are refused here, before any worker starts, with the file and the dotted
field name in the message. Secrets never come from YAML: keys that look like credentials are refused
with a pointer to the environment variables that carry them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cliplab.errors import ConfigError

SECRET_KEY = re.compile(r"(secret|password|passwd|token|access_key|api_key|credential)", re.IGNORECASE)


def _ordered(v: tuple[float, float]) -> tuple[float, float]:
    if not 0 < v[0] <= v[1]:
        raise ValueError(f"needs 0 < low <= high, got {list(v)}")
    return v


Range = Annotated[tuple[float, float], AfterValidator(_ordered)]


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ViewsConfig(Strict):
    """Extra misaligned views per image (MCD, mcd.md "Default hyperparameters"), made in the loader workers."""

    count: int = Field(0, ge=0, description="V misaligned views per image; 0 disables")
    crop_scale: Range = (0.08, 1.0)
    crop_ratio: Range = (0.75, 4.0 / 3.0)
    hflip: bool = True
    colour_jitter: float = Field(0.0, ge=0, lt=1, description="max brightness/contrast/saturation change")


class CaptionsConfig(Strict):
    """Several captions per image (holistic.md "Inputs and outputs"): an ordered list of caption slots.

    Slot c is read from the sample's json `field`: a dict by the slot's name, a list by the slot's position.
    A slot named `txt` is the sample's plain caption (`data.caption_key`). A missing or empty caption falls
    back to the plain caption and is matched freely to a branch (holistic.md "Losses" 5).
    """

    field: str = Field("captions", description="json field holding the captions (dict by slot name, or list)")
    slots: list[str] = Field(min_length=1, description="caption slots in branch order, e.g. [txt, colour, shape]")

    @field_validator("slots")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"slot names must be unique, got {v}")
        return v


class DataConfig(Strict):
    """Where the shards are and how they become batches."""

    train_shards: str = Field(description="WebDataset URL(s): brace lists, s3://, file:// or local paths")
    val_shards: str | None = None
    batch_size: int = Field(64, gt=0, description="micro-batch per Ray worker")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per Ray worker")
    shuffle_buffer: int = Field(1000, ge=0)
    resampled: bool = False
    samples_per_epoch: int | None = Field(None, gt=0, description="required when resampled")
    image_size: int = Field(64, gt=0)
    crop_scale: Range = (0.6, 1.0)
    crop_ratio: Range = (0.75, 4.0 / 3.0)
    hflip: bool = False
    caption_key: str = Field("txt", description="sample field that holds the caption")
    captions: CaptionsConfig | None = Field(
        None, description="multi-caption slots (holistic objective, per-perspective retrieval)"
    )
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    seed: int = 0
    pin_memory: bool | None = Field(
        None, description="page-locked loader batches for asynchronous GPU copies; none = on when training on GPU"
    )
    decode: Literal["cpu", "device"] = Field(
        "cpu", description="where JPEGs are decoded and the train crop made: loader workers, or the training device"
    )

    @model_validator(mode="after")
    def _epoch_size(self) -> DataConfig:
        if self.resampled and self.samples_per_epoch is None:
            raise ValueError("resampled: true needs samples_per_epoch")
        return self

    @model_validator(mode="after")
    def _device_decode_views(self) -> DataConfig:
        if self.decode == "device" and self.views.count:
            raise ValueError(
                f"decode: device makes the train view only, not the extra views (data.views.count = "
                f"{self.views.count}); set data.decode: cpu or data.views.count: 0"
            )
        return self


class BranchesConfig(Strict):
    """A multi-branch image tower (holistic.md "Multi-branch image encoders") on an open_clip ViT."""

    design: Literal["cls", "mlp"] = Field(
        description="cls: M class tokens (Psi_CLS); mlp: M parallel MLP output projections in the last blocks (Psi_MLP)"
    )
    count: int = Field(ge=2, description="M image embeddings per image (one embedding: leave branches unset)")
    mlp_blocks: int = Field(3, ge=1, description="mlp design: how many final blocks get M c_proj branches")


class ModelConfig(Strict):
    """An open_clip model by registered name, or an inline open_clip model config for small runs."""

    name: str | None = Field(None, description="open_clip model name, e.g. ViT-B-32")
    config: dict[str, Any] | None = Field(None, description="inline open_clip config: embed_dim, vision_cfg, text_cfg")
    pretrained: str | None = Field(None, description="local open_clip checkpoint to initialise from")
    init_logit_scale: float = Field(2.6592, description="log(1/0.07), open_clip's default")
    max_logit_scale: float = Field(100.0, gt=1.0, description="temperature bound: exp(logit_scale) <= this")
    branches: BranchesConfig | None = Field(None, description="multi-branch image tower; none = one embedding")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.name is None) == (self.config is None):
            raise ValueError("give exactly one of model.name or model.config")
        if self.config is not None:
            missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(self.config)
            if missing:
                raise ValueError(f"model.config lacks {sorted(missing)}")
        return self


class ObjectiveConfig(BaseModel):
    """`name` picks a registered objective; every other key is validated by that objective's own schema."""

    model_config = ConfigDict(extra="allow")
    name: str = "clip"

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(Strict):
    """AdamW with linear warmup, then cosine decay (or constant)."""

    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class DeepSpeedSection(Strict):
    """The DeepSpeed engine: ZeRO stage, precision, clipping; `overrides` is merged into the DS JSON."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    overrides: dict[str, Any] = Field(default_factory=dict)


class ComputeSection(Strict):
    """GPU-speed switches: torch.compile, activation checkpointing and the optimizer kernel (see train/engine.py).

    `compile` runs after `deepspeed.initialize`, in place (`nn.Module.compile`, which DeepSpeed's
    `engine.compile()` calls for `model`): the engine has already cast, placed and hooked the module, and an
    in-place compile keeps every parameter name, so checkpoints and exports look the same either way.
    `blocks` compiles each transformer block of every tower instead (regional compile), for when a
    whole-model graph fights DeepSpeed's hooks or takes too long to build; not at ZeRO-3, where `model` runs
    but breaks its graph at every module's parameter-gathering hook.
    """

    compile: Literal["none", "model", "blocks"] = Field(
        "none", description="torch.compile: none, the whole model, or each transformer block (regional)"
    )
    compile_backend: str | None = Field(
        None, description="torch.compile backend (e.g. inductor, aot_eager); default: the accelerator's, inductor"
    )
    grad_checkpointing: bool = Field(False, description="recompute every tower's block activations in backward")
    optimizer: Literal["auto", "torch", "fused"] = Field(
        "auto", description="AdamW kernel: auto = DeepSpeed FusedAdam on GPU, torch AdamW on CPU"
    )


class TrainConfig(Strict):
    """Length and cadence of the run."""

    steps: int = Field(gt=0)
    accum_steps: int = Field(1, ge=1, description="micro-batches per step; negatives stay global")
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    seed: int = 0
    torch_threads: int | None = Field(None, gt=0, description="intra-op threads per worker; default cores/worker")
    peak_flops: float | None = Field(None, gt=0, description="device peak FLOP/s for MFU when not auto-detected")
    crash_at_step: int | None = Field(
        None, ge=0, description="fault injection: raise once at this step (tests of resume); never in real runs"
    )
    step_delay_s: float | None = Field(
        None, ge=0, description="fault drills: sleep this long after every step, so a kill lands mid-run"
    )


class ScalingSection(Strict):
    """How many Ray Train workers and what each holds."""

    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the last checkpoint")
    collective_timeout_s: int = Field(
        600, gt=0, description="torch.distributed timeout: a lost peer fails the step after this (then a restart)"
    )


class StorageConfig(Strict):
    """Where Ray keeps checkpoints and the exported model: a local path or s3:// (endpoint from env)."""

    path: str = "cliplab-runs"
    outage_budget_s: float = Field(
        300.0,
        gt=0,
        description="how long an unreachable S3 endpoint is retried (shard reads, checkpoints) before the run fails",
    )


class TrackingConfig(Strict):
    """MLflow: URI (MLFLOW_TRACKING_URI wins), experiment, run name and where new experiments keep artifacts."""

    tracking_uri: str | None = None
    experiment: str = "cliplab"
    run_name: str | None = None
    artifact_location: str | None = Field(None, description="artifact root for a new experiment, e.g. s3://b/mlflow")
    log_model: bool = Field(True, description="log the exported model to MLflow and register a model version")
    registered_model: str | None = Field(None, description="registry name of the model (default: cliplab-NAME)")


class ZeroShotTask(Strict):
    """Zero-shot classification: labels from a dotted field of the sample json, prompts from templates.

    A label is a class name, or an integer class index into `classnames` (img2dataset's extra columns and
    many classification sets store class ids). Numeric classnames are used as the prompts' text.
    """

    name: str
    label_field: str
    classnames: list[str] = Field(min_length=2)
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], min_length=1)

    @field_validator("classnames", mode="before")
    @classmethod
    def _numbers_as_text(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [str(c) if isinstance(c, int | float) and not isinstance(c, bool) else c for c in v]
        return v

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, v: list[str]) -> list[str]:
        for t in v:
            if "{}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' for the class name")
        return v


class EvalConfig(Strict):
    """Held-out evaluation, run every `every_steps` and at the end."""

    every_steps: int | None = Field(None, gt=0)
    max_samples: int = Field(1000, gt=0, description="held-out samples embedded per evaluation")
    batch_size: int = Field(128, gt=0)
    zeroshot: list[ZeroShotTask] = Field(default_factory=list)
    misalignment_probe: bool = Field(False, description="crop-scale vs distance probe (eval/probes.py)")
    probe_images: int = Field(200, gt=0, description="held-out images the probe crops (6 crops each)")


class Experiment(Strict):
    """A whole experiment: data, model, objective, optimiser, engine, compute, scaling, storage, tracking, eval."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: DataConfig
    model: ModelConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    compute: ComputeSection = Field(default_factory=ComputeSection)
    train: TrainConfig
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _coherent(self) -> Experiment:
        if self.deepspeed.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("deepspeed.precision fp16 needs scaling.use_gpu: true; use bf16 or fp32 on CPU")
        if self.compute.optimizer == "fused" and not self.scaling.use_gpu:
            raise ValueError("compute.optimizer fused needs scaling.use_gpu: true; use auto or torch on CPU")
        if self.compute.compile == "blocks" and self.deepspeed.zero_stage == 3:
            raise ValueError(
                "compute.compile blocks does not work with deepspeed.zero_stage 3 (compiled blocks read partitioned "
                "parameters ZeRO-3 has not gathered); use compile: model, or ZeRO stage 0, 1 or 2"
            )
        if self.eval.zeroshot and not self.data.val_shards:
            raise ValueError("eval.zeroshot needs data.val_shards")
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view of the whole config (MLflow params, sweep spaces)."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("config", "overrides"):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _find_secrets(tree: Any, path: str = "") -> list[str]:
    if isinstance(tree, dict):
        found = []
        for key, value in tree.items():
            dotted = f"{path}.{key}" if path else str(key)
            if SECRET_KEY.search(str(key)):
                found.append(dotted)
            found.extend(_find_secrets(value, dotted))
        return found
    if isinstance(tree, list):
        return [hit for i, v in enumerate(tree) for hit in _find_secrets(v, f"{path}[{i}]")]
    return []


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML scalar/list/map)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty part in key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `dotted.key=value` in a copy of the raw config tree, creating sections as needed."""
    out = yaml.safe_load(yaml.safe_dump(tree))
    for text in overrides:
        parts, value = parse_override(text)
        set_dotted(out, parts, value, f"--set {text!r}")
    return out


def set_dotted(tree: dict[str, Any], parts: list[str], value: Any, label: str) -> None:
    """Set `tree[a][b]...[z] = value` in place, creating sections; `label` names the setting in errors."""
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{label}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    """One config file as a mapping, refusing a missing file, a folder, invalid YAML or a non-mapping."""
    check_config_file(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return tree


def read_tree(path: str | Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw tree of an experiment file, with its `base:` chain resolved (as sweep files do).

    A file with `base: other.yaml` (relative to the file) holds nothing but `base` and `overrides`, a map
    of dotted keys to values set on the base's tree like `--set` (a value replaces the whole field, a
    section included). Bases may have bases; a file reached twice along the chain is a cycle and refused.
    """
    path = Path(path)
    tree = read_yaml(path)
    if "base" not in tree:
        return tree
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(here) :], here))
        raise ConfigError(f"{path}: base: cycle of experiment files {cycle}")
    base, overrides = tree.pop("base"), tree.pop("overrides", None) or {}
    if tree:
        raise ConfigError(
            f"{path}: {', '.join(sorted(tree))}: a file with base: holds only base and overrides "
            "(dotted keys, e.g. overrides: {train.steps: 100})"
        )
    if not isinstance(base, str) or not isinstance(overrides, dict):
        raise ConfigError(f"{path}: base: needs a file name and overrides: a map of dotted keys to values")
    out = read_tree(path.parent / base, (*chain, here))
    for key, value in overrides.items():
        parts = str(key).split(".")
        if not all(parts):
            raise ConfigError(f"{path}: overrides.{key}: empty part in the dotted key")
        set_dotted(out, parts, value, f"{path}: overrides.{key}")
    return out


def _describe(exc: ValidationError, source: str) -> str:
    """One line per error, each naming its dotted field (a cross-field rule names its fields itself)."""
    lines = [f"{source}: invalid experiment config"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `cliplab config schema`)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        if not loc:  # a rule over the whole experiment: its message starts with the field it is about
            lines.append(f"  {msg}")
            continue
        lines.append(
            f"  {loc}: {msg}"
            + (
                f" (got {err['input']!r})"
                if err["type"] not in ("missing",) and not isinstance(err.get("input"), dict)
                else ""
            )
        )
    return "\n".join(lines)


def check_tree(tree: Any, source: str) -> None:
    """What every config file must be before its schema is applied: a mapping of sections, holding no secret."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(tree).__name__}")
    secrets = _find_secrets(tree)
    if secrets:
        raise ConfigError(
            f"{source}: {', '.join(secrets)}: secrets are never read from config files; set them in the "
            "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_TOKEN, ...)"
        )


def validate_tree(tree: dict[str, Any], source: str = "<config>") -> Experiment:
    """Validate a raw tree into an Experiment, including the objective's own parameters."""
    check_tree(tree, source)
    try:
        exp = Experiment.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    _check_objective(exp, source)
    return exp


def _check_objective(exp: Experiment, source: str) -> None:
    """The objective's parameters, the batch fields it reads, and its own rules against the experiment."""
    from cliplab.data.fields import missing_fields
    from cliplab.objectives.registry import get_spec

    try:
        spec = get_spec(exp.objective.name)
    except KeyError as exc:
        raise ConfigError(f"{source}: objective.name: {exc.args[0]}") from None
    try:
        params = spec.params.model_validate(exp.objective.params)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source).replace("\n  ", "\n  objective.")) from None
    missing = missing_fields(spec.batch_fields, exp.data)
    if missing:
        lines = [
            f"objective {spec.name} needs {setting} (it reads the batch fields {', '.join(fields)})"
            for setting, fields in missing.items()
        ]
        raise ConfigError(f"{source}: invalid experiment config\n  " + "\n  ".join(lines))
    try:
        spec.check(params, exp)
    except ValueError as exc:
        raise ConfigError(f"{source}: invalid experiment config\n  {exc}") from None


def check_config_file(path: Path, kind: str = "config") -> None:
    """Refuse a missing path and a directory with different messages (both used to read "no such file")."""
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml"))[:5]
        hint = f"; it holds {', '.join(inside)}" if inside else ""
        raise ConfigError(f"{path}: is a directory, not a {kind} file; give the YAML file itself{hint}")
    if not path.is_file():
        raise ConfigError(f"{path}: no such {kind} file")


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read a YAML experiment file (and its bases), apply `--set` overrides, validate; errors name file and field."""
    tree = apply_overrides(read_tree(path), overrides or [])
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return validate_tree(tree, source)


def dump_yaml(exp: Experiment) -> str:
    """The resolved config as YAML (logged as an artifact; reloadable with load_experiment)."""
    return yaml.safe_dump(exp.model_dump(mode="json", exclude_none=False), sort_keys=False)
