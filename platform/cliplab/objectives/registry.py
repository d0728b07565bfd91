"""Objectives register under a name with their parameter schema; the train loop knows only this interface.

An objective turns one micro-batch into per-sample features (`embed`) and the features of the whole
local batch into a loss (`loss`). Keeping the two apart lets the train loop cache features of every
micro-batch without gradient and recompute one at a time with gradient (contrastive accumulation)
without knowing what the features are.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pydantic import BaseModel


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


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    params: type[BaseModel]
    build: Callable[[Any], Objective]


_REGISTRY: dict[str, ObjectiveSpec] = {}
_BUILTIN_MODULES = ("cliplab.objectives.clip", "cliplab.objectives.mcd", "cliplab.objectives.holistic")


def register(name: str, params: type[BaseModel]) -> Callable[[Callable[[Any], Objective]], Callable[[Any], Objective]]:
    """Decorator: `@register("clip", ClipParams)` over a factory taking the validated params."""

    def wrap(build: Callable[[Any], Objective]) -> Callable[[Any], Objective]:
        _REGISTRY[name] = ObjectiveSpec(name, params, build)
        return build

    return wrap


def _spec(name: str) -> ObjectiveSpec:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    if name not in _REGISTRY:
        raise KeyError(f"unknown objective {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def validate_params(name: str, params: dict[str, Any]) -> BaseModel:
    """Validate an objective's parameters against its schema (raises pydantic.ValidationError)."""
    return _spec(name).params.model_validate(params)


def build_objective(name: str, params: dict[str, Any]) -> Objective:
    spec = _spec(name)
    return spec.build(spec.params.model_validate(params))
