"""cliplab on Ray Train + DeepSpeed ZeRO-2 (`cliplab train`, 2 workers) against `torchrun --nproc_per_node 2` DDP.

Same model, symmetric InfoNCE loss, reader, batch per worker, fp32, gloo on CPU, one torch thread per worker.
"""

from __future__ import annotations

from pathlib import Path

from ab import interleave
from procs import Timing, timed_run
from workload import PYTHON, SMALL_MODEL, Workload, child_env, cliplab_samples, cliplab_train

TORCHRUN_TRAIN = Path(__file__).with_name("torchrun_train.py")


def torchrun(config: Path, engine: str, workers: int) -> list[str]:
    """The command that trains `config` with `engine` on `workers` local processes."""
    return [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(workers),
        str(TORCHRUN_TRAIN),
        str(config),
        "--engine",
        engine,
    ]


def compare(w: Workload, pairs: int, ray_address: str) -> dict[str, list[Timing]]:
    """Per side ('cliplab Ray+ZeRO-2', 'torchrun DDP'), one Timing per round."""
    config = w.cliplab_config("vs-ddp", SMALL_MODEL, workers=2, zero=2, threads=1)
    parse = cliplab_samples(w.batch, 2)

    def cliplab() -> Timing:
        cmd, env = cliplab_train(config, ray_address)
        return timed_run(cmd, env, parse, 2 * w.batch, w.log_path("cliplab-2workers"))

    def ddp() -> Timing:
        env = child_env(OMP_NUM_THREADS="1")
        return timed_run(torchrun(config, "ddp", 2), env, parse, 2 * w.batch, w.log_path("torchrun-ddp"))

    return interleave({"cliplab Ray+ZeRO-2": cliplab, "torchrun DDP": ddp}, pairs)
