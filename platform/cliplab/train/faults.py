"""Fault injection for resume tests and drills: `train.crash_at_step` raises once, never after a resume."""

from __future__ import annotations

from cliplab.config import Experiment


class InjectedCrash(RuntimeError):
    """Raised once at `train.crash_at_step` to exercise resume-from-checkpoint."""


def inject_crash(exp: Experiment, step: int, resumed: bool) -> None:
    """Raise InjectedCrash at the configured step of a run that has not been resumed yet."""
    if not resumed and exp.train.crash_at_step is not None and step == exp.train.crash_at_step:
        raise InjectedCrash(f"train.crash_at_step={step}: injected fault")
