"""Training objectives behind a registry: `clip` now; MCD and holistic register next to it."""

from cliplab.objectives.registry import Objective, build_objective, register, validate_params

__all__ = ["Objective", "build_objective", "register", "validate_params"]
