"""Objectives are found through Python entry points; each one's module owns everything cliplab knows about it.

An objective turns one micro-batch into per-sample features (`embed`) and the features of the whole
local batch into a loss (`loss`). Keeping the two apart lets the train loop cache features of every
micro-batch without gradient and recompute one at a time with gradient (contrastive accumulation)
without knowing what the features are.

An objective's module defines one `ObjectiveSpec` (name, parameter schema, factory, the batch fields it
reads, its logged terms and its rules against the whole experiment) and names it in the
`cliplab.objectives` entry-point group of its distribution's metadata, e.g. in pyproject.toml:

    [project.entry-points."cliplab.objectives"]
    clip = "cliplab.objectives.clip:SPEC"

cliplab's own objectives register the same way, so adding one touches its module and that line only,
and an objective in another installed package registers without touching cliplab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution, entry_points
from typing import TYPE_CHECKING, Any, Protocol

import torch
from pydantic import BaseModel

from cliplab.errors import InstallError

if TYPE_CHECKING:
    from cliplab.config import Experiment

GROUP = "cliplab.objectives"


class Objective(Protocol):
    """What the train loop calls. Feature dicts are batch-first; `loss` returns (total, named terms)."""

    def embed(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-sample features of one micro-batch and the model's logit scale (from the same forward)."""
        ...

    def loss(
        self, feats: dict[str, torch.Tensor], logit_scale: torch.Tensor, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss over the local batch, gathering across workers as the objective requires."""
        ...

    def after_step(self, engine: Any) -> None:
        """Called on every rank after each optimizer step (e.g. to move an EMA teacher)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """State the objective keeps between steps, saved with every checkpoint ({} for stateless ones)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        ...


def no_rules(params: Any, exp: Experiment) -> None:
    """The default `check`: an objective with no rules beyond its own parameter schema."""


def no_terms(params: Any, exp: Experiment) -> tuple[str, ...]:
    """The default `terms`: an objective that logs its total loss only."""
    return ()


@dataclass(frozen=True)
class ObjectiveSpec:
    """Everything about one objective.

    `check(params, exp)` holds the objective's rules against the whole experiment: it raises ValueError
    naming the dotted fields involved, and `validate_tree` reports that as a ConfigError naming the file.
    `batch_fields` are the reader's batch keys `embed`/`loss` use (see `cliplab.data.fields`); `terms`
    maps (params, exp) to the names of the terms `loss` returns, which are logged as metrics.
    """

    name: str
    params: type[BaseModel]
    build: Callable[[Any], Objective]
    batch_fields: frozenset[str] = frozenset({"image", "text"})
    terms: Callable[[Any, Experiment], tuple[str, ...]] = no_terms
    check: Callable[[Any, Experiment], None] = no_rules


@cache
def registered() -> dict[str, ObjectiveSpec]:
    """Every objective named in the installed `cliplab.objectives` entry points, loaded once per process."""
    found = entry_points(group=GROUP)
    if not any(ep.dist is not None and ep.dist.name == "cliplab" for ep in found):
        raise InstallError(
            f"cliplab's own objectives are missing from the {GROUP!r} entry points of the cliplab metadata "
            f"Python finds first ({_metadata_location()}): an install older than pyproject.toml, or a stale "
            "cliplab.egg-info earlier on sys.path; reinstall cliplab (pip install -e .) or delete that folder"
        )
    specs: dict[str, ObjectiveSpec] = {}
    for ep in found:
        spec = ep.load()
        if not isinstance(spec, ObjectiveSpec) or spec.name != ep.name:
            raise InstallError(f"entry point {ep.name} = {ep.value}: expected an ObjectiveSpec named {ep.name!r}")
        specs[ep.name] = spec
    return specs


def _metadata_location() -> str:
    try:
        dist = distribution("cliplab")
    except PackageNotFoundError:
        return "none installed"
    return str(getattr(dist, "_path", None) or dist.locate_file(""))


def get_spec(name: str) -> ObjectiveSpec:
    """The registered objective `name` (KeyError listing the registered ones otherwise)."""
    specs = registered()
    if name not in specs:
        raise KeyError(f"unknown objective {name!r}; registered: {sorted(specs)}")
    return specs[name]


def validate_params(name: str, params: dict[str, Any]) -> BaseModel:
    """Validate an objective's parameters against its schema (raises pydantic.ValidationError)."""
    return get_spec(name).params.model_validate(params)


def build_objective(name: str, params: dict[str, Any]) -> Objective:
    """A ready objective from its name and raw parameters."""
    spec = get_spec(name)
    return spec.build(spec.params.model_validate(params))
