"""Fault injection for resume tests and drills: `train.crash_at_step` raises once, never after a resume;
`train.step_delay_s` paces the steps so that a kill or an outage lands mid-run."""

from __future__ import annotations

import time

from cliplab.config import Experiment


class InjectedCrash(RuntimeError):
    """Raised once at `train.crash_at_step` to exercise resume-from-checkpoint."""


def inject_crash(exp: Experiment, step: int, resumed: bool) -> None:
    """Raise InjectedCrash at the configured step of a run that has not been resumed yet."""
    if not resumed and exp.train.crash_at_step is not None and step == exp.train.crash_at_step:
        raise InjectedCrash(f"train.crash_at_step={step}: injected fault")


def inject_delay(exp: Experiment) -> None:
    """Sleep `train.step_delay_s` (every rank, after every step: the ranks stay in step)."""
    if exp.train.step_delay_s:
        time.sleep(exp.train.step_delay_s)
