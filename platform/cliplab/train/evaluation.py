"""Held-out evaluation during training: zero-shot, retrieval, the optional misalignment probe, their figures.

Every rank embeds its share of the held-out set (all of it, by sample index); rank 0 logs the figures.
"""

from __future__ import annotations

from typing import Any

import torch

from cliplab.config import Experiment
from cliplab.eval.probes import misalignment_probe
from cliplab.eval.runner import evaluate_experiment
from cliplab.models.factory import Preprocess, build_model
from cliplab.tracking.mlflow import RunLogger
from cliplab.tracking.plots import branch_slot_heatmap, calibration_plot
from cliplab.train.engine import full_state_dict
from cliplab.train.worker import Worker


class ForwardEncoders(torch.nn.Module):
    """encode_image/encode_text through the model's forward, so ZeRO-3 gathers root-level parameters."""

    def __init__(self, engine: Any, dtype: torch.dtype):
        super().__init__()
        self.engine = engine
        self.dtype = dtype

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.engine(image=image.to(self.dtype))["image_features"].float()

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.engine(text=text)["text_features"].float()


def eval_model(engine: Any, exp: Experiment, worker: Worker) -> torch.nn.Module:
    """What evaluation encodes with: the engine itself, or at ZeRO-3 a full local copy of the model.

    ZeRO-3 forwards gather parameters across ranks, so every rank would have to encode the same number of
    batches; ranks' shares of the held-out shards differ, so they evaluate a gathered copy instead.
    """
    if engine.zero_optimization_stage() != 3:
        return ForwardEncoders(engine, worker.dtype)
    model, _ = build_model(exp.model)
    model.load_state_dict(full_state_dict(engine))
    return model.to(worker.device).eval()


def evaluate_at_step(
    engine: Any, exp: Experiment, tokenizer: Any, pre: Preprocess, worker: Worker, tracker: RunLogger | None, step: int
) -> dict[str, float]:
    """The held-out metrics at this step (every rank calls it); rank 0 also logs the per-branch and probe figures."""
    encoders = eval_model(engine, exp, worker)
    engine.eval()
    captions = exp.data.captions
    try:
        metrics = evaluate_experiment(encoders, exp, pre, tokenizer, worker.device, worker.rank, worker.world)
        if tracker and exp.model.branches and captions:
            title = f"{exp.name} step {step}: per-branch R@1 by caption slot"
            fig = branch_slot_heatmap(metrics, captions.slots, exp.model.branches.count, title)
            tracker.figure(fig, f"plots/branch_retrieval_step{step:08d}.png")
        if exp.eval.misalignment_probe:
            probe = misalignment_probe(
                encoders,
                tokenizer,
                exp.data.val_shards,
                pre.image_size,
                pre.mean,
                pre.std,
                exp.data.caption_key,
                worker.rank,
                worker.world,
                exp.eval.probe_images,
                worker.device,
            )
            points = probe.pop("points")
            metrics.update(probe)
            if tracker:
                fig = calibration_plot(points, f"{exp.name} ({exp.objective.name}) step {step}")
                tracker.figure(fig, f"plots/misalignment_step{step:08d}.png")
        return metrics
    finally:
        engine.train()
