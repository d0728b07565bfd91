"""In-process step ratios: MCD and holistic CLIP steps against the CLIP step, and the reader against the step.

Every side trains cliplab's step (DeepSpeed engine, objective, temperature clamp) on one worker on batches
read once beforehand, so only the step is timed: MCD (anchor + 2 misaligned views) against CLIP on the
demo model; holistic CLIP (5 caption slots; multi-CLS and parallel-MLP towers) against CLIP on the tiny ViT
of configs/clip_vit_demo.yaml. The reader's samples/s (local shards, no training) is set against the CLIP
step's: above 1.0 the reader keeps up with the step. Needs a one-process torch.distributed group
(`single_process_group`), which it sets in this process's environment.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ab import interleave
from cliplab.config import Experiment, read_tree, validate_tree
from cliplab.data.pipeline import make_train_loader
from cliplab.data.tokenize import build_tokenizer
from cliplab.models.factory import build_model
from cliplab.objectives import build_objective
from cliplab.objectives.registry import get_spec
from cliplab.train.engine import build_engine, clamp_logit_scale, contrastive_step
from workload import Workload

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = CONFIGS / "demo.yaml"
HOLISTIC = {
    "ViT CLIP step": CONFIGS / "clip_vit_demo.yaml",
    "holistic Psi_CLS step": CONFIGS / "holistic_cls_demo.yaml",
    "holistic Psi_MLP step": CONFIGS / "holistic_mlp_demo.yaml",
}
WARMUP = 2


def single_process_group() -> None:
    """A one-rank gloo group on 127.0.0.1, as DeepSpeed needs one even for a single worker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    torch.distributed.init_process_group("gloo")


def _experiment(w: Workload, objective: str | None = "clip", config: Path = DEMO) -> Experiment:
    """The config's experiment on the workload's shards and batch, one worker, ZeRO-2 at its precision."""
    tree = read_tree(config)
    tree["data"].update(train_shards=w.shards, val_shards=None, batch_size=w.batch, num_workers=1)
    if objective is not None:
        tree["objective"] = {"name": objective}
    if objective == "mcd":
        tree["data"]["views"] = {"count": 2}
    tree["eval"] = {}
    tree["deepspeed"].update(zero_stage=2, precision=w.precision)
    tree["scaling"]["num_workers"] = 1
    return validate_tree(tree, str(config))


def _batches(exp: Experiment, count: int, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    loader, _ = make_train_loader(exp.data, build_tokenizer(exp.model), (0.5,) * 3, (0.5,) * 3, 0, 1, None)
    it = iter(loader)
    return [{k: b[k] for k in keys} for b in (next(it) for _ in range(count))]


def _step_rate(exp: Experiment, batches: list[dict[str, Any]]) -> Callable[[], float]:
    """A side: samples/s of a fresh engine's step on `batches` after WARMUP steps."""

    def measure() -> float:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[exp.deepspeed.precision]
        torch.manual_seed(0)
        engine = build_engine(build_model(exp.model)[0], exp, world_size=1)
        objective = build_objective(exp.objective.name, exp.objective.params)
        cast = [{k: v.to(dtype) if k in ("image", "views") else v for k, v in b.items()} for b in batches]
        for i, batch in enumerate(cast):
            if i == WARMUP:
                start = time.perf_counter()
            contrastive_step(engine, objective, [batch])
            clamp_logit_scale(engine, exp.model.max_logit_scale)
        return sum(b["image"].shape[0] for b in cast[WARMUP:]) / (time.perf_counter() - start)

    return measure


def _reader_rate(exp: Experiment, count: int) -> Callable[[], float]:
    """A side: samples/s of a fresh reader over `count` batches after its first, with the objective's fields only."""

    def measure() -> float:
        fields = get_spec(exp.objective.name).batch_fields
        tok = build_tokenizer(exp.model)
        loader, _ = make_train_loader(exp.data, tok, (0.5,) * 3, (0.5,) * 3, 0, 1, None, fields)
        it = iter(loader)
        next(it)
        start = time.perf_counter()
        samples = sum(next(it)["image"].shape[0] for _ in range(count))
        return samples / (time.perf_counter() - start)

    return measure


def compare(w: Workload, pairs: int) -> dict[str, dict[str, list[float]]]:
    """Per group ('mcd', 'holistic', 'reader'), per side, samples/s per round."""
    steps = w.steps + WARMUP
    mcd, clip = _experiment(w, "mcd"), _experiment(w, "clip")
    views = _batches(mcd, steps, ("image", "text", "crop_box", "views", "view_boxes", "view_jitter"))
    holistic = {name: _experiment(w, None, path) for name, path in HOLISTIC.items()}
    slots = _batches(next(iter(holistic.values())), steps, ("image", "text", "texts", "caption_own"))
    plain = [{k: b[k] for k in ("image", "text")} for b in views]
    return {
        "mcd": interleave({"MCD step": _step_rate(mcd, views), "CLIP step": _step_rate(clip, views)}, pairs),
        "holistic": interleave({name: _step_rate(exp, slots) for name, exp in holistic.items()}, pairs),
        "reader": interleave({"reader": _reader_rate(clip, w.steps), "CLIP step": _step_rate(clip, plain)}, pairs),
    }
