"""The workload every comparison shares: SynthScenes shards on local disk, the model, batch and precision.

Both tools get the same open_clip model config: cliplab inline in its experiment YAML, open_clip_train as
`--model local-dir:DIR` (DIR/open_clip_config.json).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cliplab.data.synth import SynthSpec, write_synthscenes

# configs/demo.yaml's tiny CLIP (ModifiedResNet image tower, 2-layer text transformer)
SMALL_MODEL: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}
# ~70M parameters, most in the text tower: parameter and optimizer state dominate a worker's memory
LARGE_MODEL: dict[str, Any] = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 4},
}
PYTHON = sys.executable
CLIPLAB_STEP = re.compile(r"\[rank 0\] step (\d+)/\d+")


@dataclass(frozen=True)
class Workload:
    """Where the shards are and how every side trains on them."""

    root: Path
    shards: str
    batch: int
    steps: int
    log_every: int
    precision: str = "fp32"
    grad_clip: float = 1.0  # gradient-norm clipping: cliplab's default, given to every side

    def cliplab_config(self, name: str, model: dict[str, Any], workers: int, zero: int, threads: int) -> Path:
        """A cliplab experiment YAML for this workload (no evaluation, no checkpoint before the last step)."""
        return self.write_config(name, self.cliplab_tree(name, model, workers, zero, threads))

    def write_config(self, name: str, tree: dict[str, Any]) -> Path:
        """`tree` as root/NAME.yaml."""
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        return path

    def cliplab_tree(self, name: str, model: dict[str, Any], workers: int, zero: int, threads: int) -> dict[str, Any]:
        """The experiment tree of `cliplab_config`, with the model inline (`model.config`)."""
        return {
            "name": name,
            "data": {
                "train_shards": self.shards,
                "batch_size": self.batch,
                "num_workers": 1,
                "crop_scale": [0.9, 1.0],  # open_clip's RandomResizedCrop scale
            },
            "model": {"config": model},
            "deepspeed": {"zero_stage": zero, "precision": self.precision, "grad_clip": self.grad_clip},
            "train": {
                "steps": self.steps,
                "log_every": self.log_every,
                "checkpoint_every": self.steps,
                "torch_threads": threads,
            },
            "scaling": {"num_workers": workers, "cpus_per_worker": threads},
            "storage": {"path": str(self.root / "runs")},
            "tracking": {
                "tracking_uri": f"sqlite:///{self.root / 'mlflow.db'}",
                "experiment": "benchmarks",
                "log_model": False,
            },
        }

    def log_path(self, side: str) -> Path:
        """A new log file for one run of `side`: root/SIDE-1.log, SIDE-2.log, ... (every round's output is kept)."""
        n = 1
        while (self.root / f"{side}-{n}.log").exists():
            n += 1
        return self.root / f"{side}-{n}.log"

    def open_clip_model_dir(self, model: dict[str, Any]) -> Path:
        """A directory open_clip loads with `local-dir:` (config only, random weights)."""
        path = self.root / "open_clip_model"
        path.mkdir(exist_ok=True)
        (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model}))
        return path


def make_workload(
    root: Path, samples: int, batch: int, steps: int, log_every: int, image_size: int = 64, shards: int = 8
) -> Workload:
    """Write `samples` SynthScenes samples of `image_size` px as `shards` shards under root/shards."""
    per_shard = -(-samples // shards)
    spec = SynthSpec(num_samples=per_shard * shards, samples_per_shard=per_shard, image_size=image_size, seed=0)
    write_synthscenes(str(root / "shards"), spec)
    return Workload(root, str(root / "shards" / f"{{00000..{shards - 1:05d}}}.tar"), batch, steps, log_every)


def cliplab_samples(batch: int, workers: int) -> Callable[[str], int | None]:
    """The parser of cliplab-format progress lines (`[rank 0] step K/N`): samples done at that line."""

    def parse(line: str) -> int | None:
        m = CLIPLAB_STEP.search(line)
        return int(m.group(1)) * batch * workers if m else None

    return parse


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a benchmark subprocess, unbuffered, with `extra` set."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def cliplab_train(config: Path, ray_address: str) -> tuple[list[str], dict[str, str]]:
    """`cliplab train CONFIG` and its environment, connected to the Ray at `ray_address` (on 127.0.0.1).

    Ray's cluster mode is off in the child as in `cliplab.runtime.start_local_ray`: with it on, a driver takes
    the machine's IP as its node address and never finds the raylet listening on 127.0.0.1.
    """
    env = child_env(RAY_ADDRESS=ray_address, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return [PYTHON, "-m", "cliplab.cli", "train", str(config)], env
