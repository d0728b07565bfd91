"""`train_loop_per_worker`: what each Ray Train worker runs, a short driver over the train/ units.

config -> data -> model -> objective -> DeepSpeed engine -> steps -> report (metrics, checkpoints) ->
rank-0 tracking. Every rank calls `ray.train.report` at the same steps (a barrier in Train V2), and every
collective (metric reduction, evaluation, temperature clamp, export) is called by every rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import ray.train

from cliplab.config import Experiment
from cliplab.data.device_decode import DeviceDecoder
from cliplab.data.pipeline import StreamPosition, make_train_loader, resolve_pin_memory
from cliplab.data.tokenize import build_tokenizer
from cliplab.models.factory import Preprocess, build_model
from cliplab.objectives.registry import build_objective, get_spec
from cliplab.tracking.mlflow import ZERO_STAGE_USED, RunLogger
from cliplab.train import checkpoint
from cliplab.train.engine import (
    build_engine,
    clamp_logit_scale,
    contrastive_step,
    full_state_dict,
    partition_config,
)
from cliplab.train.export import export_model
from cliplab.train.faults import inject_crash, inject_delay
from cliplab.train.step_metrics import progress_line, step_metrics
from cliplab.train.throughput import Meter, device_peak_flops, training_flops_per_sample
from cliplab.train.worker import Worker, device_decoder, start_worker

log = logging.getLogger("cliplab.train")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    exp = Experiment.model_validate(config["experiment"])
    worker = start_worker(exp)
    model, pre = build_model(exp.model, partition_config(exp, worker.world))
    tokenizer = build_tokenizer(exp.model)
    objective = build_objective(exp.objective.name, exp.objective.params)
    step, ckpt = 0, ray.train.get_checkpoint()
    if ckpt is None:  # from the start of the stream: its loader workers read the first batch during DeepSpeed's set-up
        batches, position = _open_stream(exp, tokenizer, pre, worker, None)
    engine = build_engine(model, exp, worker.world)
    if ckpt is not None:
        step, data_state, objective_state = checkpoint.restore(engine, ckpt, worker.rank)
        objective.load_state_dict(objective_state)
        log.info("resumed from checkpoint at step %d", step)
        batches, position = _open_stream(exp, tokenizer, pre, worker, data_state)
    decoder = device_decoder(exp.data, pre.mean, pre.std, worker)
    tracker = _tracker(config, worker.rank, step if ckpt is not None else None)
    if tracker:  # ZeRO-1/2 on one worker runs as ZeRO-0 (engine.zero_stage_for): say which stage ran
        tracker.params({ZERO_STAGE_USED: engine.zero_optimization_stage()})

    meter, flops, counted = Meter(), None, False
    peak = exp.train.peak_flops or device_peak_flops(worker.device, exp.deepspeed.precision)
    while step < exp.train.steps:
        micro = _micro_batches(batches, exp.train.accum_steps, meter, position, worker, decoder)
        if not counted:  # once, on this worker's first real micro-batch
            flops, counted = training_flops_per_sample(engine.module, objective, micro[0]), True
        loss, terms = contrastive_step(engine, objective, micro)
        scale = clamp_logit_scale(engine, exp.model.max_logit_scale)
        step += 1
        meter.add(exp.data.batch_size * exp.train.accum_steps * worker.world)
        inject_crash(exp, step, resumed=ckpt is not None)
        inject_delay(exp)

        last = step == exp.train.steps
        metrics: dict[str, float] = {}
        if step % exp.train.log_every == 0 or last:
            values = {"loss": float(loss), **{k: float(v) for k, v in terms.items()}}
            skipped = position.state_dict()["skipped"]
            metrics = step_metrics(values, engine.get_lr()[0], scale, meter.read(), skipped, flops, peak, worker.world)
        if exp.data.val_shards and exp.eval.every_steps and (step % exp.eval.every_steps == 0 or last):
            metrics.update(_evaluate(engine, exp, tokenizer, pre, worker, tracker, step))
        if metrics and tracker:
            tracker.metrics(metrics, step)
            log.info(progress_line(step, exp.train.steps, metrics))
        due = step % exp.train.checkpoint_every == 0 or last
        _report(engine, objective, position, worker, step, metrics if config["report_metrics"] else {}, due)

    state = full_state_dict(engine)
    if tracker:
        export_model(state, exp, tracker, config["export_dir"])


def _open_stream(
    exp: Experiment, tokenizer: Any, pre: Preprocess, worker: Worker, data_state: dict[str, Any] | None
) -> tuple[Iterator[dict[str, Any]], StreamPosition]:
    """This rank's batches from `data_state` (None: the start) and their position; the loader workers start now."""
    fields, pin = get_spec(exp.objective.name).batch_fields, resolve_pin_memory(exp.data, worker.device)
    loader, position = make_train_loader(
        exp.data, tokenizer, pre.mean, pre.std, worker.rank, worker.world, data_state, fields, pin
    )
    return iter(loader), position


def _evaluate(
    engine: Any, exp: Experiment, tokenizer: Any, pre: Preprocess, worker: Worker, tracker: RunLogger | None, step: int
) -> dict[str, float]:
    """`evaluate_at_step`, imported at the first evaluation: a run without held-out data never loads the
    evaluation's scipy and matplotlib (seconds of every worker's start-up)."""
    from cliplab.train.evaluation import evaluate_at_step

    return evaluate_at_step(engine, exp, tokenizer, pre, worker, tracker, step)


def _tracker(config: dict[str, Any], rank: int, resumed_at: int | None) -> RunLogger | None:
    """Rank 0's MLflow logger, which skips steps already in the run (a restarted group replays them)."""
    if rank != 0:
        return None
    tracker = RunLogger(config["tracking_uri"], config["mlflow_run_id"])
    tracker.skip_logged_steps()
    if resumed_at is not None:
        tracker.metrics({"resumed_from_step": resumed_at}, resumed_at)
    return tracker


def _micro_batches(
    batches: Iterator[dict[str, Any]],
    accum: int,
    meter: Meter,
    position: StreamPosition,
    worker: Worker,
    decoder: DeviceDecoder | None,
) -> list[dict[str, Any]]:
    """The next `accum` batches on the device, the wait for each counted and the stream position advanced."""
    micro = []
    for _ in range(accum):
        t0 = time.perf_counter()
        batch = next(batches)
        meter.waited(time.perf_counter() - t0)
        position.update(batch)
        micro.append(worker.to_device(batch, decoder))
    return micro


def _report(
    engine: Any,
    objective: Any,
    position: StreamPosition,
    worker: Worker,
    step: int,
    metrics: dict[str, float],
    with_checkpoint: bool,
) -> None:
    """`ray.train.report` on every rank: with a checkpoint (engine, stream position, objective state) when due,
    else the step's metrics when there are any to hand over."""
    if with_checkpoint:
        tmp = checkpoint.save(engine, step, position.state_dict(), worker.rank, objective.state_dict())
        ray.train.report(
            {"step": step, **metrics},
            checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
            checkpoint_dir_name=f"checkpoint_step{step:08d}",
        )
        checkpoint.discard(tmp)
    elif metrics:
        ray.train.report({"step": step, **metrics})
