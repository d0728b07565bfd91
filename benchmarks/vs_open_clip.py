"""cliplab (`cliplab train`, 1 Ray worker, ZeRO-2) against open_clip's own trainer (`python -m open_clip_train.main`).

Same shards, model config, batch, precision (fp32), gradient clipping, torch threads and DataLoader workers.
open_clip_train's data stage needs webdataset <= 0.2.86: that version is installed into a directory of its
own, put first on PYTHONPATH for the open_clip_train subprocess only.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ab import interleave
from procs import Timing, timed_run
from workload import PYTHON, SMALL_MODEL, Workload, child_env, cliplab_samples, cliplab_train

WEBDATASET = "webdataset==0.2.86"
WEBDATASET_DIR = Path.home() / ".cache" / "cliplab-bench" / "webdataset-0.2.86"  # kept between runs
OPEN_CLIP_PROGRESS = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/")


def install_webdataset(target: Path) -> Path:
    """pip-install open_clip_train's webdataset into `target` (kept between runs); returns `target`."""
    if not (target / "webdataset").is_dir():
        subprocess.run(
            [PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), WEBDATASET], check=True
        )
    return target


def open_clip_samples(line: str) -> int | None:
    m = OPEN_CLIP_PROGRESS.search(line)
    return int(m.group(1)) if m else None


def open_clip_command(
    w: Workload, model: str, workers: int, device: str, precision: str | None = None, extra: tuple[str, ...] = ()
) -> list[str]:
    """`python -m open_clip_train.main` on the workload's shards: one epoch of `steps x batch` samples."""
    return [
        PYTHON,
        "-m",
        "open_clip_train.main",
        "--model",
        model,
        "--train-data",
        w.shards,
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(w.steps * w.batch),
        "--batch-size",
        str(w.batch),
        "--epochs",
        "1",
        "--workers",
        str(workers),
        "--precision",
        precision or w.precision,
        "--log-every-n-steps",
        str(w.log_every),
        "--grad-clip-norm",  # open_clip_train clips nothing unless told; cliplab and torchrun clip
        str(w.grad_clip),
        "--save-frequency",
        "0",
        "--device",
        device,
        "--logs",
        str(w.root / "open_clip_logs"),
        *extra,
    ]


def open_clip_run(cmd: list[str], w: Workload, webdataset_dir: Path, threads: int) -> Timing:
    """Run open_clip_train (its own webdataset first on PYTHONPATH) and time its progress lines."""
    site = install_webdataset(webdataset_dir)
    env = child_env(PYTHONPATH=f"{site}:{child_env().get('PYTHONPATH', '')}", OMP_NUM_THREADS=str(threads))
    log = w.log_path("open_clip_train")
    return timed_run([*cmd, "--name", log.stem], env, open_clip_samples, w.batch, log)


def compare(w: Workload, pairs: int, threads: int, webdataset_dir: Path, ray_address: str) -> dict[str, list[Timing]]:
    """Per side ('cliplab', 'open_clip_train'), one Timing per round."""
    config = w.cliplab_config("vs-open-clip", SMALL_MODEL, workers=1, zero=2, threads=threads)
    open_clip_cmd = open_clip_command(w, f"local-dir:{w.open_clip_model_dir(SMALL_MODEL)}", 1, "cpu")

    def cliplab() -> Timing:
        cmd, env = cliplab_train(config, ray_address)
        return timed_run(cmd, env, cliplab_samples(w.batch, 1), w.batch, w.log_path("cliplab-1worker"))

    return interleave(
        {"cliplab": cliplab, "open_clip_train": lambda: open_clip_run(open_clip_cmd, w, webdataset_dir, threads)},
        pairs,
    )
