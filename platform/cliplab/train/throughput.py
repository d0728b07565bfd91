"""Throughput bookkeeping: samples/s, share of time waiting for data, and model FLOPs utilisation."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger("cliplab.train")

# Dense peak FLOP/s per device for bf16/fp16 tensor-core math (vendor data sheets); fp32 runs use TF32.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12},
}


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak for this precision if it is a known GPU; None on CPU or unknown devices."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def training_flops_per_sample(model: torch.nn.Module, objective: Any, batch: dict[str, Any]) -> float | None:
    """FLOPs of forward + backward per sample, counted once on a real sample (backward ~ 2x forward).

    The forward is the objective's own (`embed`): extra views or caption slots count. `embed` is per sample,
    so its first sample alone is counted: on a CPU a forward of the whole micro-batch costs a third of a step.
    Counted in eval mode so that batch-norm statistics are not touched; None where the counter fails.
    Counted eagerly under `compute.compile`: this eval, no-grad call would otherwise compile graphs of its own,
    and the count must not depend on how dynamo treats the counter's dispatch mode. The recompute of
    `compute.grad_checkpointing` is not counted (a no-grad forward runs once), so MFU stays model FLOPs utilisation.
    """
    model.eval()
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            objective.embed(model, first_sample(batch))
    except RuntimeError as exc:
        log.warning("FLOP counting failed (%s); tflops_per_s and mfu are not reported", exc)
        return None
    finally:
        model.train()
    return 3.0 * counter.get_total_flops()


def first_sample(batch: dict[str, Any]) -> dict[str, Any]:
    """The micro-batch cut to its first sample: every tensor and list along its batch dimension."""
    return {
        k: v[:1] if isinstance(v, list) or (isinstance(v, torch.Tensor) and v.ndim) else v for k, v in batch.items()
    }


class Meter:
    """Accumulates time and samples between log lines; `read()` returns rates and resets."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.wait = 0.0
        self.samples = 0

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def add(self, samples: int) -> None:
        self.samples += samples

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"samples_per_s": self.samples / elapsed, "data_wait_frac": self.wait / elapsed}
        self.__init__()
        return out
