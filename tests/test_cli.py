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


def test_inspect_of_nothing_fails_naming_the_missing_shard(tmp_path: Path) -> None:
    shown = cliplab("shards", "inspect", f"{tmp_path}/nope.tar")
    assert shown.returncode == 2 and not shown.stdout
    assert (
        f"cliplab: error: {tmp_path}/nope.tar: no samples in its 1 shard(s): shard {tmp_path}/nope.tar: no such object"
        in (shown.stderr)
    )
    assert "Traceback" not in shown.stderr


def experiment_file(tmp_path: Path, train_shards: str, width: object = 64) -> Path:
    model = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": width, "layers": 1, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    tree = {"name": "x", "data": {"train_shards": train_shards}, "model": {"config": model}, "train": {"steps": 2}}
    path = tmp_path / "exp.yaml"
    path.write_text(json.dumps(tree))
    return path


def test_a_wrong_type_in_model_config_is_refused_by_validate_and_before_ray(tmp_path: Path) -> None:
    path = experiment_file(tmp_path, f"{tmp_path}/{{0..3}}.tar", width="64")
    for command in ("train", "validate"):
        proc = cliplab(command, str(path)) if command == "train" else cliplab("config", "validate", str(path))
        assert proc.returncode == 2, proc.stderr
        assert "model.config.vision_cfg.width: expected int, got '64'" in proc.stderr
        assert "Traceback" not in proc.stderr and "Ray" not in proc.stdout + proc.stderr


def test_train_refuses_shards_that_do_not_exist_or_are_too_few_before_ray(tmp_path: Path, capsys) -> None:
    import ray

    from cliplab.cli import main

    ray_was_up = ray.is_initialized()  # the suite's session Ray may be up already; this test must not start one
    assert main(["train", str(experiment_file(tmp_path, f"{tmp_path}/none/{{00000..00003}}.tar"))]) == 2
    assert "cliplab: error: data.train_shards: none of the 4 shards of" in capsys.readouterr().err
    for i in range(3):
        (tmp_path / f"{i}.tar").write_bytes(b"x")
    assert (
        main(["train", str(experiment_file(tmp_path, f"{tmp_path}/{{0..2}}.tar")), "--set", "data.num_workers=2"]) == 2
    )
    assert "data.train_shards: 3 shards (of 3 named) for 2 Ray workers x 2 loader workers" in capsys.readouterr().err
    assert ray.is_initialized() == ray_was_up


def test_config_validate_prints_the_resolved_config_and_schema_is_json() -> None:
    root = Path(__file__).resolve().parents[1]
    out = cliplab("config", "validate", str(root / "configs" / "demo.yaml"), "--set", "optim.lr=0.002")
    assert out.returncode == 0, out.stderr
    assert "lr: 0.002" in out.stdout and "zero_stage: 2" in out.stdout
    schema = json.loads(cliplab("config", "schema").stdout)
    assert "data" in schema["properties"] and "objective" in schema["properties"]
