"""The sweep file: a base experiment, a search space over its dotted fields, the metric, search and scheduler.

    base: mcd_demo.yaml              # relative to the sweep file
    overrides: {train.steps: 90}     # applied to the base before sampling (like --set)
    space:
      objective.lambda_c: {loguniform: [0.25, 4.0]}
      objective.lambda_d: {uniform: [0.0, 2.0]}
      optim.lr: {grid: [1.0e-3, 3.0e-3]}
      data.views.count: {choice: [1, 2]}
    metric: zeroshot/shape/top1
    mode: max

Every grid and choice value and both ends of every range are applied to the base and validated as a whole
experiment before any trial starts, so a typo in a field name or an out-of-range value is refused up front.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cliplab.config import (
    Experiment,
    apply_overrides,
    check_config_file,
    parse_override,
    read_tree,
    validate_tree,
)
from cliplab.errors import ConfigError
from cliplab.metrics import is_held_out, is_train_metric


class Dist(BaseModel):
    """One dimension: exactly one of grid, choice, uniform, loguniform."""

    model_config = ConfigDict(extra="forbid")
    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> Dist:
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {given or 'none'})")
        values = self.grid if self.grid is not None else self.choice
        if values is not None and not values:
            raise ValueError(f"{given[0]}: needs at least one value")
        low_high = self.uniform or self.loguniform
        if low_high is not None:
            low, high = low_high
            if not low < high:
                raise ValueError(f"{given[0]}: needs low < high, got {list(low_high)}")
            if self.loguniform is not None and low <= 0:
                raise ValueError(f"loguniform: needs 0 < low, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None)

    def probes(self) -> list[Any]:
        """Values that stand for the whole dimension when validating: every listed value, or both ends."""
        return list(getattr(self, self.kind))


class Scheduler(BaseModel):
    """ASHA over training steps: trials are compared at grace_period, grace_period*rf, ... steps."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(1, gt=0, description="steps every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    base: str = Field(description="experiment YAML, relative to the sweep file")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted fields set on the base")
    space: dict[str, Dist] = Field(min_length=1)
    metric: str
    mode: Literal["max", "min"]
    num_samples: int = Field(1, gt=0, description="samples of the space (each grid point is sampled this often)")
    max_concurrent: int | None = Field(None, gt=0, description="default: as many trials as the cluster fits")
    search: Literal["random", "optuna"] = "random"
    seed: int = 0
    scheduler: Scheduler = Field(default_factory=Scheduler)
    trial_cpus: float = Field(0.1, gt=0, description="CPU of each trial's driver (the Train controller's parent)")
    max_trial_failures: int = Field(0, ge=0, description="Tune retries of a failed trial (each resumes its run)")

    @model_validator(mode="after")
    def _grid_only_with_random(self) -> SweepConfig:
        if self.search == "optuna" and any(d.kind == "grid" for d in self.space.values()):
            raise ValueError("search optuna samples its own points; use choice instead of grid")
        return self


def point_overrides(point: dict[str, Any]) -> list[str]:
    """`--set`-style overrides for one sampled point."""
    return [f"{k}={json.dumps(v)}" for k, v in point.items()]  # JSON is YAML


def experiment_at(base_tree: dict[str, Any], point: dict[str, Any], source: str) -> Experiment:
    """The base experiment with a sampled point applied and validated."""
    return validate_tree(apply_overrides(base_tree, point_overrides(point)), source)


def _check_metric(sweep: SweepConfig, exp: Experiment, source: str) -> None:
    if is_held_out(sweep.metric):
        if not (exp.data.val_shards and exp.eval.every_steps):
            raise ConfigError(
                f"{source}: metric {sweep.metric!r} is an evaluation metric; the base experiment "
                "needs data.val_shards and eval.every_steps"
            )
    elif not is_train_metric(sweep.metric):
        raise ConfigError(
            f"{source}: metric {sweep.metric!r}: not a metric cliplab reports (use an evaluation "
            "metric such as retrieval/i2t_R1 or zeroshot/<task>/top1, or loss)"
        )
    if sweep.scheduler.name == "asha" and sweep.scheduler.grace_period > exp.train.steps:
        raise ConfigError(
            f"{source}: scheduler.grace_period {sweep.scheduler.grace_period} > train.steps {exp.train.steps}"
        )


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, dict[str, Any]]:
    """Read and check a sweep file; returns it and the base experiment's raw tree (overrides applied)."""
    path = Path(path)
    check_config_file(path, "sweep")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        sweep = SweepConfig.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    except ValidationError as exc:
        lines = [f"{path}: invalid sweep config"]
        lines += [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    base_path = (path.parent / sweep.base).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: no such experiment file {base_path}")
    base_tree = read_tree(base_path)
    sets = point_overrides(sweep.overrides) + list(overrides or [])
    base_tree = apply_overrides(base_tree, sets)
    for text in overrides or []:
        if ".".join(parse_override(text)[0]) in sweep.space:
            raise ConfigError(f"--set {text}: that field is swept")
    source = f"{path} (base {base_path.name})"
    base = validate_tree(base_tree, source)
    _check_metric(sweep, base, str(path))
    for field, dist in sweep.space.items():
        for value in dist.probes():
            try:
                experiment_at(base_tree, {field: value}, f"{path}: space.{field}={value!r}")
            except ConfigError as exc:
                raise ConfigError(str(exc)) from None
    return sweep, base_tree
