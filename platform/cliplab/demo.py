"""`cliplab demo` and `cliplab compare --embedded`: the platform on one machine with no outside service.

An embedded S3 endpoint (moto) on 127.0.0.1, SynthScenes train/val shards written to the URLs the config
names, a local Ray, training by 2 Ray workers under DeepSpeed streaming the shards from S3, held-out
evaluation, and a local MLflow store. Ends with a results table and the command that opens MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from cliplab.config import Experiment, load_experiment
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.embedded import create_bucket, s3_env, start_s3_server
from cliplab.shipped import shipped_config

log = logging.getLogger("cliplab.demo")

TRAIN_SAMPLES = 20000
VAL_SAMPLES = 1000


def _shard_count(url: str) -> int:
    """Number of shards a `{00000..000NN}.tar` brace range names."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", url)
    return int(match.group(2)) - int(match.group(1)) + 1 if match else 1


def local_overrides(workdir: Path, steps: int | None = None) -> list[str]:
    """Keep checkpoints and the MLflow store under `workdir` (the embedded S3 endpoint dies with the run)."""
    out = [f"storage.path={workdir / 'runs'}", f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"]
    return out + ([f"train.steps={steps}"] if steps else [])


@contextlib.contextmanager
def embedded_synthscenes(exp: Experiment, train_samples: int = TRAIN_SAMPLES) -> Iterator[str]:
    """Start the embedded S3 endpoint, write SynthScenes to the config's train/val URLs; yields the endpoint."""
    started = time.time()
    bucket = exp.data.train_shards.removeprefix("s3://").split("/", 1)[0]
    with start_s3_server() as s3:
        os.environ.update(s3_env(s3.endpoint))
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        create_bucket(s3.endpoint, bucket)
        log.info("embedded S3 endpoint at %s, bucket %s", s3.endpoint, bucket)
        n_train = _shard_count(exp.data.train_shards)
        per_shard = train_samples // n_train
        write_synthscenes(
            exp.data.train_shards.rsplit("/", 1)[0],
            SynthSpec(num_samples=per_shard * n_train, samples_per_shard=per_shard, seed=0),
        )
        if exp.data.val_shards:
            n_val = _shard_count(exp.data.val_shards)
            write_synthscenes(
                exp.data.val_shards.rsplit("/", 1)[0],
                SynthSpec(num_samples=VAL_SAMPLES, samples_per_shard=VAL_SAMPLES // n_val, seed=10_000),
            )
        log.info("SynthScenes written in %.0fs", time.time() - started)
        yield s3.endpoint


def run_demo(workdir: str = "cliplab-demo", train_samples: int | None = None, steps: int | None = None) -> None:
    """Run the demo end to end; everything it keeps goes under `workdir`."""
    from cliplab.preflight import check_before_ray
    from cliplab.runtime import check_fits, ensure_ray
    from cliplab.tracking.mlflow import ui_hint
    from cliplab.train.trainer import run_training, summary_table

    started = time.time()
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    exp = load_experiment(shipped_config("demo.yaml"), local_overrides(root, steps))
    with embedded_synthscenes(exp, train_samples or TRAIN_SAMPLES):
        log.info("training %s for %d steps", exp.name, exp.train.steps)
        check_before_ray(exp)
        ensure_ray()
        check_fits(exp)
        outcome = run_training(exp)

    print("\n" + summary_table(outcome))
    print(f"\ndemo finished in {(time.time() - started) / 60:.1f} min; run {outcome.run_name}")
    print(f"open the MLflow UI:  {ui_hint(outcome.tracking_uri, outcome.mlflow_run_id)}")
