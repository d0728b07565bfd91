"""`train_loop_per_worker`: what each Ray Train worker runs.

config -> data -> model -> objective -> DeepSpeed engine -> steps -> report (metrics, checkpoints) ->
rank-0 tracking. Every rank calls `ray.train.report` at the same steps (a barrier in Train V2), and every
collective (loss average, evaluation, temperature clamp, export) is called by every rank.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from cliplab import storage
from cliplab.config import Experiment
from cliplab.data.pipeline import StreamPosition, make_train_loader
from cliplab.data.tokenize import build_tokenizer
from cliplab.eval.probes import misalignment_probe
from cliplab.eval.runner import evaluate_experiment
from cliplab.metrics import is_headline
from cliplab.models.factory import Preprocess, build_model
from cliplab.objectives.registry import build_objective
from cliplab.tracking.mlflow import MODEL_URI_TAG, RunLogger
from cliplab.tracking.plots import branch_slot_heatmap, calibration_plot
from cliplab.train import checkpoint
from cliplab.train.engine import build_engine, clamp_logit_scale, contrastive_step, full_state_dict
from cliplab.train.throughput import Meter, device_peak_flops, training_flops_per_sample

log = logging.getLogger("cliplab.train")


class InjectedCrash(RuntimeError):
    """Raised once at `train.crash_at_step` to exercise resume-from-checkpoint."""


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    exp = Experiment.model_validate(config["experiment"])
    storage.configure(exp.storage.outage_budget_s)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _log_to_stdout(rank)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed.*deprecated", category=FutureWarning)
    torch.set_num_threads(exp.train.torch_threads or max(1, int(exp.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device()
    torch.manual_seed(exp.train.seed)

    model, pre = build_model(exp.model)
    tokenizer = build_tokenizer(exp.model)
    objective = build_objective(exp.objective.name, exp.objective.params)
    engine = build_engine(model, exp, world)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[exp.deepspeed.precision]

    step, data_state = 0, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        step, data_state, objective_state = checkpoint.restore(engine, ckpt, rank)
        objective.load_state_dict(objective_state)
        log.info("resumed from checkpoint at step %d", step)
    loader, position = make_train_loader(exp.data, tokenizer, pre.mean, pre.std, rank, world, data_state)
    batches = iter(loader)
    tracker = RunLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None
    if tracker:
        tracker.skip_logged_steps()
    if tracker and ckpt is not None:
        tracker.metrics({"resumed_from_step": step}, step)

    meter, flops, counted = Meter(), None, False
    peak = exp.train.peak_flops or device_peak_flops(device, exp.deepspeed.precision)
    crash_armed = exp.train.crash_at_step is not None and ckpt is None  # once: never after a resume
    while step < exp.train.steps:
        micro = []
        for _ in range(exp.train.accum_steps):
            t0 = time.perf_counter()
            batch = next(batches)
            meter.waited(time.perf_counter() - t0)
            position.update(batch)
            micro.append(_to_device(batch, device, dtype))
        if not counted:
            flops, counted = training_flops_per_sample(engine.module, objective, micro[0]), True
        loss, terms = contrastive_step(engine, objective, micro)
        scale = clamp_logit_scale(engine, exp.model.max_logit_scale)
        step += 1
        meter.add(exp.data.batch_size * exp.train.accum_steps * world)
        if crash_armed and step == exp.train.crash_at_step:
            raise InjectedCrash(f"train.crash_at_step={step}: injected fault")

        last = step == exp.train.steps
        metrics: dict[str, float] = {}
        if step % exp.train.log_every == 0 or last:
            metrics = _step_metrics(engine, loss, terms, scale, meter, position, flops, peak, world)
        if exp.data.val_shards and exp.eval.every_steps and (step % exp.eval.every_steps == 0 or last):
            metrics.update(_evaluate(engine, exp, tokenizer, pre, device, dtype, rank, world, tracker, step))
        if metrics and tracker:
            tracker.metrics(metrics, step)
            log.info(_progress_line(step, exp.train.steps, metrics))
        if step % exp.train.checkpoint_every == 0 or last:
            tmp = checkpoint.save(engine, step, position.state_dict(), rank, objective.state_dict())
            ray.train.report(
                {"step": step, **metrics},
                checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                checkpoint_dir_name=f"checkpoint_step{step:08d}",
            )
            checkpoint.discard(tmp)
        elif metrics:
            ray.train.report({"step": step, **metrics})

    state = full_state_dict(engine)
    if tracker:
        _export(state, exp, tracker, config["export_dir"])


def _log_to_stdout(rank: int) -> None:
    """cliplab's progress lines at INFO on stdout, without Ray Train's line per `report` call.

    Ray 2.60 logs every report (all metrics) at INFO through a logger named after its source file,
    outside the `ray.train` hierarchy that `RunConfig.logging_config` controls.
    """
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    root = logging.getLogger("cliplab")
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def _to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            out[key] = value.to(dtype) if value.is_floating_point() and key in ("image", "views") else value
        else:
            out[key] = value
    return out


def _mean_across(values: dict[str, float], world: int, op: str = "mean") -> dict[str, float]:
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    if op == "mean":
        t /= world
    return dict(zip(keys, t.tolist(), strict=True))


def _step_metrics(
    engine: Any,
    loss: torch.Tensor,
    terms: dict[str, torch.Tensor],
    scale: float,
    meter: Meter,
    position: StreamPosition,
    flops: float | None,
    peak: float | None,
    world: int,
) -> dict[str, float]:
    """Loss and terms averaged over workers, lr, temperature, throughput and data health."""
    m = _mean_across({"loss": float(loss), **{k: float(v) for k, v in terms.items()}}, world)
    rates = _mean_across(meter.read(), world)
    skipped = position.state_dict()["skipped"]
    health = _mean_across(
        {
            "data/skipped_samples": float(skipped.get("samples", 0)),
            "data/skipped_shards": float(skipped.get("shards", 0)),
        },
        world,
        op="sum",
    )
    m.update(rates, **health, lr=engine.get_lr()[0], logit_scale=scale)
    if flops is not None:
        m["tflops_per_s"] = flops * rates["samples_per_s"] / 1e12
        if peak:
            m["mfu"] = flops * rates["samples_per_s"] / (peak * world)
    return m


def _evaluate(
    engine: Any,
    exp: Experiment,
    tokenizer: Any,
    pre: Preprocess,
    device: torch.device,
    dtype: torch.dtype,
    rank: int,
    world: int,
    tracker: RunLogger | None,
    step: int,
) -> dict[str, float]:
    """Held-out zero-shot, retrieval and (optionally) misalignment-probe metrics; every rank embeds its share."""
    encoders = _eval_model(engine, exp, dtype, device)
    engine.eval()
    captions = exp.data.captions
    try:
        metrics = evaluate_experiment(encoders, exp, pre, tokenizer, device, rank, world)
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
                rank,
                world,
                exp.eval.probe_images,
                device,
            )
            points = probe.pop("points")
            metrics.update(probe)
            if tracker:
                fig = calibration_plot(points, f"{exp.name} ({exp.objective.name}) step {step}")
                tracker.figure(fig, f"plots/misalignment_step{step:08d}.png")
        return metrics
    finally:
        engine.train()


def _eval_model(engine: Any, exp: Experiment, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """What evaluation encodes with: the engine itself, or at ZeRO-3 a full local copy of the model.

    ZeRO-3 forwards gather parameters across ranks, so every rank would have to encode the same number of
    batches; ranks' shares of the held-out shards differ, so they evaluate a gathered copy instead.
    """
    if engine.zero_optimization_stage() != 3:
        return ForwardEncoders(engine, dtype)
    model, _ = build_model(exp.model)
    model.load_state_dict(full_state_dict(engine))
    return model.to(device).eval()


def _progress_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (
        ("loss", "{:.4f}"),
        ("lr", "{:.2e}"),
        ("logit_scale", "{:.1f}"),
        ("samples_per_s", "{:.0f}"),
        ("data_wait_frac", "{:.0%}"),
    ):
        if key in m:
            parts.append(f"{key} " + fmt.format(m[key]))
    parts += [f"{k} {v:.3f}" for k, v in m.items() if is_headline(k)]
    return " | ".join(parts)


def _export(state: dict[str, torch.Tensor], exp: Experiment, tracker: RunLogger, export_dir: str) -> None:
    """Rank 0: write the open_clip checkpoint to storage and tag its URI on the run (the driver registers it)."""
    fs, root = storage.filesystem(export_dir)
    fs.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"cliplab-export-{tracker.run_id}-") as local:
        files = checkpoint.export_open_clip(state, exp, Path(local))
        for path in files.values():
            target = f"{root.rstrip('/')}/{path.name}"
            storage.retrying(lambda p=path, t=target: fs.put_file(str(p), t), "exporting", f"{export_dir}/{path.name}")
    tracker.tags({MODEL_URI_TAG: export_dir, "cliplab.open_clip_name": checkpoint.export_model_name(exp)})
