"""Step checkpoints (DeepSpeed state + each rank's data position) and the final open_clip export.

Every rank writes its DeepSpeed shards, its own `data_rank{r}.json`, `rng_rank{r}.pt` (torch random
state, for dropout and any sampling in the model) and, for stateful objectives (an EMA teacher),
`objective_rank{r}.pt` into one temp directory; Ray
merges the per-rank directories, and DeepSpeed's file names already carry the rank, so the merged
checkpoint is complete. The data position makes a resumed run continue the data stream mid-epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import deepspeed
import torch
from ray.train import Checkpoint

from cliplab.config import Experiment
from cliplab.models.factory import CHECKPOINT_FILE, MODEL_FILE

DS_DIR = "ds"
TEMP_PREFIX = "cliplab-ckpt-"


def save(
    engine: deepspeed.DeepSpeedEngine, step: int, data_state: dict[str, Any], rank: int, objective_state: dict[str, Any]
) -> Path:
    """Write this rank's part of the step checkpoint into a fresh temp dir (collective)."""
    remove_orphans()
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-{step}-"))
    engine.save_checkpoint(str(tmp / DS_DIR), tag=f"step{step:08d}", client_state={"step": step})
    (tmp / f"data_rank{rank}.json").write_text(json.dumps({"step": step, "data": data_state}))
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, tmp / f"rng_rank{rank}.pt")
    if objective_state:
        torch.save(objective_state, tmp / f"objective_rank{rank}.pt")
    return tmp


def restore(
    engine: deepspeed.DeepSpeedEngine, checkpoint: Checkpoint, rank: int
) -> tuple[int, dict | None, dict[str, Any]]:
    """Load engine, optimizer, schedule and RNG state; return (completed steps, data position, objective state)."""
    with checkpoint.as_directory() as d:
        _, client = engine.load_checkpoint(str(Path(d) / DS_DIR))
        if client is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {d}/{DS_DIR}")
        data_file = Path(d) / f"data_rank{rank}.json"
        data = json.loads(data_file.read_text()) if data_file.exists() else None
        rng_file = Path(d) / f"rng_rank{rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file)
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        objective_file = Path(d) / f"objective_rank{rank}.pt"
        objective_state = torch.load(objective_file) if objective_file.exists() else {}
    step = int(client["step"])
    return step, (data["data"] if data else None), objective_state


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_orphans(root: Path | None = None) -> list[Path]:
    """Delete temp checkpoint dirs left by dead workers (a worker killed mid-save cannot clean up; each holds a
    rank's full optimizer shard); returns what was removed. A dir's owner is the PID in its name."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*-*"):
        pid = path.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def export_open_clip(state: dict[str, torch.Tensor], exp: Experiment, out_dir: Path) -> dict[str, Path]:
    """Save an open_clip checkpoint (and, for inline models, the model config open_clip needs to build it).

    Load it back with `open_clip.create_model_and_transforms(NAME, pretrained=PATH)`, after
    `open_clip.add_model_config(CONFIG_JSON)` for inline configs (NAME is the JSON's file stem); a
    multi-branch model loads with `cliplab.models.factory.load_exported(DIR)`, which reads the
    `cliplab_model.json` (the experiment's model section) written next to the checkpoint.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"checkpoint": out_dir / CHECKPOINT_FILE, "model": out_dir / MODEL_FILE}
    torch.save({"state_dict": state, "cliplab_experiment": exp.name}, files["checkpoint"])
    files["model"].write_text(exp.model.model_copy(update={"pretrained": None}).model_dump_json(indent=2))
    if exp.model.config is not None:
        files["config"] = out_dir / f"{export_model_name(exp)}.json"
        files["config"].write_text(json.dumps(exp.model.config, indent=2))
    return files


def export_model_name(exp: Experiment) -> str:
    """The open_clip model name under which an exported checkpoint loads."""
    return exp.model.name or f"cliplab-{exp.name}"
