"""ZeRO stages 0-3 of cliplab's DeepSpeed step, 2 torchrun workers, on a model whose state dominates memory.

Per stage: samples/s, each worker's peak RSS and the parameter + optimizer-state bytes it holds (the largest
over workers), as ratios against ZeRO-0. Workers run `torchrun_train.py --engine deepspeed` without Ray, so
that each can count the tensors it holds.
"""

from __future__ import annotations

from ab import interleave
from procs import Timing, timed_run
from vs_ddp import torchrun
from workload import LARGE_MODEL, Workload, child_env, cliplab_samples


def compare(w: Workload, pairs: int, stages: list[int]) -> dict[str, list[Timing]]:
    """Per side ('ZeRO-<stage>'), one Timing per round; each Timing's results hold both workers' memory."""
    parse = cliplab_samples(w.batch, 2)
    env = child_env(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")

    def side(stage: int):
        config = w.cliplab_config(f"zero{stage}", LARGE_MODEL, workers=2, zero=stage, threads=1)
        return lambda: timed_run(torchrun(config, "deepspeed", 2), env, parse, 2 * w.batch, w.log_path(f"zero{stage}"))

    return interleave({f"ZeRO-{s}": side(s) for s in stages}, pairs)
