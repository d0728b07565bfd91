"""What each process of a run imports at start-up: the heavy libraries only where they are used.

Every import below runs in a fresh interpreter. Ray Train's controller unpickles the run's callbacks (so
imports their module), the driver imports the trainer, and `cliplab --help` imports the CLI: none of them
trains, so none of them may pay seconds for DeepSpeed, open_clip, torchvision or matplotlib.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING = {"deepspeed", "open_clip", "torchvision", "matplotlib"}


def imported(module: str, watched: set[str]) -> set[str]:
    """Which of the `watched` top-level modules importing `module` loads, in a fresh interpreter."""
    probe = f"import json, sys, {module}; print(json.dumps(sorted(set(sys.modules).intersection({sorted(watched)!r}))))"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    ("module", "watched"),
    [
        ("cliplab.cli", TRAINING | {"torch", "mlflow", "ray"}),  # `cliplab --help` and parsing
        ("cliplab.train.callbacks", TRAINING | {"torch", "mlflow"}),  # Ray Train's controller
        ("cliplab.train.entry", TRAINING | {"torch", "mlflow"}),  # the function Ray pickles by reference
        ("cliplab.train.trainer", TRAINING),  # the driver of `cliplab train`
    ],
)
def test_start_up_imports_no_training_library(module: str, watched: set[str]) -> None:
    assert imported(module, watched) == set()


def test_the_probe_sees_what_the_training_loop_imports() -> None:
    assert imported("cliplab.train.loop", TRAINING) >= {"deepspeed", "open_clip", "torchvision"}
