"""The `ray job submit` entrypoints start as a job server runs them: `python jobs/X.py` from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_entrypoint_runs_and_shadows_no_stdlib_module(script: str) -> None:
    """jobs/select.py must not stand in for the standard library's `select` (socket, hence pydantic, imports it):
    a missing config gets as far as cliplab's own error, with no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            f"jobs/{script}",
            "--config",
            "no-such.yaml",
            *(["--run", "r"] if "evaluate" in script else []),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cliplab: error: no-such.yaml: no such" in proc.stderr and "Traceback" not in proc.stderr


def test_entrypoint_passes_the_subcommand_flags_through() -> None:
    """`--set` reaches cliplab's own config validation (refused before Ray, naming the field)."""
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--config", "configs/demo.yaml", "--set", "optim.lr=fast"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "optim.lr" in proc.stderr, proc.stderr[-2000:]
