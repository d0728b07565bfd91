"""The `cliplab` command line as a user runs it (subprocesses, real files)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def cliplab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cliplab.cli", *args], capture_output=True, text=True, timeout=300)


def test_shards_synth_then_inspect(tmp_path: Path) -> None:
    made = cliplab(
        "shards",
        "synth",
        str(tmp_path / "ds"),
        "--num-samples",
        "30",
        "--samples-per-shard",
        "10",
        "--image-size",
        "32",
        "--noisy-fraction",
        "0.2",
    )
    assert made.returncode == 0, made.stderr
    assert "wrote 30 samples in 3 shards" in made.stdout
    shown = cliplab("shards", "inspect", f"{tmp_path}/ds/{{00000..00002}}.tar", "--show", "2")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["samples"] == 30 and report["shards"] == 3
    assert set(report["extensions"]) == {"jpg", "txt", "json"}
    assert len(report["examples"]) == 2 and report["examples"][0]["image_size"] == [32, 32]


def test_inspect_names_a_missing_shard(tmp_path: Path) -> None:
    shown = cliplab("shards", "inspect", f"{tmp_path}/nope.tar")
    assert shown.returncode == 0
    assert f"{tmp_path}/nope.tar: no such object" in json.loads(shown.stdout)["shard_errors"][0]


def test_config_validate_prints_the_resolved_config_and_schema_is_json() -> None:
    root = Path(__file__).resolve().parents[1]
    out = cliplab("config", "validate", str(root / "configs" / "demo.yaml"), "--set", "optim.lr=0.002")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.002" in out.stdout and "zero_stage: 2" in out.stdout
    schema = json.loads(cliplab("config", "schema").stdout)
    assert "data" in schema["properties"] and "objective" in schema["properties"]
