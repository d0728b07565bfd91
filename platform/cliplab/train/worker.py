"""What a Ray Train worker sets up before its first step: logs, threads, seed, its rank, device and dtype."""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray.train
import torch

from cliplab import storage
from cliplab.config import DataConfig, Experiment
from cliplab.data.device_decode import DeviceDecoder

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Worker:
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype

    def to_device(self, batch: dict[str, Any], decoder: DeviceDecoder | None = None) -> dict[str, Any]:
        """Tensors onto the device; images and views in the compute dtype, token ids and labels as they are.

        With a `decoder` (data.decode: device) the encoded images become `image` on the device first. A copy
        is asynchronous only from pinned memory (data.pin_memory); from pageable memory it is synchronous.
        """
        if decoder is not None:
            batch = decoder(batch)
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=value.is_pinned())
                out[key] = value.to(self.dtype) if value.is_floating_point() and key in ("image", "views") else value
            else:
                out[key] = value
        return out


def device_decoder(
    data: DataConfig, mean: Sequence[float], std: Sequence[float], worker: Worker
) -> DeviceDecoder | None:
    """The decoder `to_device` needs under data.decode: device (None when loader workers decode)."""
    return DeviceDecoder(data.image_size, mean, std, worker.device) if data.decode == "device" else None


def start_worker(exp: Experiment) -> Worker:
    """Storage policy, logging, torch threads and seed for this Ray Train worker."""
    storage.configure(exp.storage.outage_budget_s)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    log_to_stdout(rank)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed.*deprecated", category=FutureWarning)
    torch.set_num_threads(exp.train.torch_threads or max(1, int(exp.scaling.cpus_per_worker)))
    torch.manual_seed(exp.train.seed)
    return Worker(rank, world, ray.train.torch.get_device(), DTYPES[exp.deepspeed.precision])


def log_to_stdout(rank: int) -> None:
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
