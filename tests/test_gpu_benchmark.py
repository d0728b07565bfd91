"""benchmarks/gpu.sh on CPU (`--smoke`): eager and both switches train, as does open_clip_train, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SIDES = ["cliplab eager", "cliplab compiled + GPU decode", "open_clip_train"]


@pytest.mark.slow
def test_gpu_benchmark_smoke_trains_both_switches_and_open_clip_and_prints_the_table(tmp_path: Path, ray_local) -> None:
    work, out = tmp_path / "work", tmp_path / "gpu.json"
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--smoke", "--workdir", str(work), "--json", str(out), "--ray-address", address],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT / "platform")},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sides = json.loads(out.read_text())["sides"]
    assert [s["name"] for s in sides] == SIDES
    assert all(s["samples_per_s"] > 0 and s["startup_s"] > 0 for s in sides)
    assert sides[0]["flops_per_sample"] > 0  # read from cliplab's progress lines: MFU on a GPU depends on it
    compiled = yaml.safe_load((work / "cliplab-compiled-GPU-decode.yaml").read_text())
    assert (
        compiled["compute"] == {"compile_backend": "aot_eager", "compile": "model"}
        and compiled["data"]["decode"] == "device"
    )
    assert "vs open_clip_train" in proc.stdout and "goal: cliplab compiled + GPU decode" in proc.stdout
