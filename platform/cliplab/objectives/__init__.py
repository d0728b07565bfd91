"""Training objectives, found through the `cliplab.objectives` entry points (see registry.py)."""

from cliplab.objectives.registry import Objective, ObjectiveSpec, build_objective, get_spec, validate_params

__all__ = ["Objective", "ObjectiveSpec", "build_objective", "get_spec", "validate_params"]
