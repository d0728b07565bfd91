"""Training objectives behind a registry: `clip`, `mcd` and `holistic` (see registry.py)."""

from cliplab.objectives.registry import Objective, build_objective, register, validate_params

__all__ = ["Objective", "build_objective", "register", "validate_params"]
