"""`cliplab demo select`: data selection end to end on one machine, with ground truth to grade it.

1. The embedded S3 endpoint and a clean SynthScenes training set (seed 0), as `cliplab demo` writes them;
   the teacher is trained on it by the demo recipe (configs/demo.yaml; `--steps`, `--train-samples`).
2. A pool of another seed (1) where `noisy_fraction` (30%) of the captions belong to other images, and a
   target set (seed 2) whose distribution differs from the pool's: only images whose main shape is one of
   `target_shapes` (2 of SynthScenes' 6), for NormSim.
3. The selection job (`cliplab select`'s run: embedding pass on Ray Data, CLIPScore, negCLIPLoss, NormSim_inf,
   an MLflow run) with negCLIPLoss top `fractions[0]` then near-duplicate removal (DEDUP) as its own recipe;
   every score and each step's kept flags land in scores.parquet.
4. From those scores, CLIPScore, negCLIPLoss and negCLIPLoss + NormSim_inf (and a random subset) at each kept
   fraction, graded by `cliplab.select.evaluation`, plus the job's own negCLIPLoss + dedup selection at the
   fraction it kept; the table is printed and logged to the selection run.
5. With `train_steps` > 0, the closed loop (`cliplab.select.closeloop`): the demo recipe trained for `train_steps`
   on each of the negCLIPLoss, CLIPScore and random subsets of `fractions[0]` of the pool, evaluated on the demo's
   clean held-out set; that table is printed and logged to the selection run too.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from cliplab.config import Experiment
from cliplab.data.shards import filesystem, write_shards
from cliplab.data.synth import SynthSpec, render_sample, scene, write_synthscenes
from cliplab.select.evaluation import Method, evaluate, format_table, kept_mask, standard_methods
from cliplab.tracking.mlflow import ui_hint

log = logging.getLogger("cliplab.demo")
BUCKET = "cliplab-demo"
POOL_SEED, TARGET_SEED = 1, 2
SAMPLES_PER_SHARD = 1000
LOOP_STEPS = 120  # per closed-loop run: half the teacher's 240; about 4 minutes a run on 2 CPU cores
LOOP_EXPERIMENT = "cliplab-demo-closed-loop"
DEDUP = {"threshold": 0.95, "clusters": 10, "rank_by": "negclip"}  # the job's second recipe step


def target_samples(spec: SynthSpec, shapes: Sequence[str], count: int) -> Iterator[dict[str, Any]]:
    """The first `count` samples of `spec` whose main (largest) shape is one of `shapes`, keys renumbered."""
    index = found = 0
    while found < count:
        if scene(spec, index)[0][0].shape in shapes:
            sample = render_sample(spec, index)
            sample["__key__"] = f"{found:09d}"
            yield sample
            found += 1
        index += 1


def main_shapes(spec: SynthSpec, keys: Sequence[str]) -> np.ndarray:
    """The main shape of each pool sample, from its key (SynthScenes keys are sample indices)."""
    return np.array([scene(spec, int(k))[0][0].shape for k in keys], dtype=object)


def selection_tree(
    pool: str, target: str, teacher_run: str, tracking_uri: str, fraction: float, batch_size: int, repeats: int
) -> dict[str, Any]:
    """The selection job's config for the demo pool (a CPU teacher actor, MLflow in the demo's store)."""
    return {
        "name": "demo-select",
        "pool": {"shards": pool},
        "teacher": {"run_id": teacher_run},
        "target": {"shards": target},
        "scores": {"negclip": {"batch_size": batch_size, "repeats": repeats, "seed": 0}, "normsim_p": ["inf"]},
        "recipe": {"steps": [{"score": "negclip", "fraction": fraction}, {"dedup": DEDUP}]},
        "output": f"s3://{BUCKET}/select/demo-select",
        "embed": {"actors": 1, "cpus_per_actor": 1, "cpus_per_read": 1, "batch_size": 256},
        "tracking": {"tracking_uri": tracking_uri, "experiment": "cliplab-demo-select"},
    }


def run_select_demo(
    workdir: str = "cliplab-demo-select",
    train_samples: int | None = None,
    steps: int | None = None,
    pool_samples: int = 10000,
    target_count: int = 1000,
    noisy_fraction: float = 0.3,
    fractions: Sequence[float] = (0.5, 0.7),
    target_shapes: Sequence[str] = ("circle", "square"),
    negclip_batch: int = 1024,
    repeats: int = 10,
    train_steps: int | None = None,
) -> str:
    """Train the teacher, select, grade, close the loop (`train_steps`, default LOOP_STEPS; 0 skips it).

    Prints the tables and returns the grades; everything kept goes under `workdir`.
    """
    from cliplab.config import load_experiment
    from cliplab.demo import TRAIN_SAMPLES, embedded_synthscenes, local_overrides
    from cliplab.errors import ConfigError
    from cliplab.preflight import check_before_ray
    from cliplab.runtime import check_fits, ensure_ray
    from cliplab.select.closeloop import close_loop
    from cliplab.select.config import validate_selection
    from cliplab.select.run import run_selection
    from cliplab.shipped import shipped_config
    from cliplab.train.trainer import run_training

    train_steps = LOOP_STEPS if train_steps is None else train_steps
    if train_steps < 0:
        raise ConfigError(f"demo select: --train-steps must be >= 0 (0 skips the closed loop), got {train_steps}")
    started = time.time()
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    exp = load_experiment(shipped_config("demo.yaml"), local_overrides(root, steps))
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    per_shard = min(SAMPLES_PER_SHARD, pool_samples)
    pool_spec = SynthSpec(
        num_samples=pool_samples, samples_per_shard=per_shard, noisy_fraction=noisy_fraction, seed=POOL_SEED
    )
    with embedded_synthscenes(exp, train_samples or TRAIN_SAMPLES):
        pool_urls = write_synthscenes(f"s3://{BUCKET}/select/pool", pool_spec)
        target_urls = write_shards(
            f"s3://{BUCKET}/select/target",
            target_samples(SynthSpec(num_samples=10 * target_count, seed=TARGET_SEED), target_shapes, target_count),
            min(SAMPLES_PER_SHARD, target_count),
        )
        log.info("demo select: training the teacher (%s, %d steps) on the clean seed-0 pool", exp.name, exp.train.steps)
        check_before_ray(exp)
        ensure_ray()
        check_fits(exp)
        teacher = run_training(exp)
        cfg = validate_selection(
            selection_tree(
                f"s3://{BUCKET}/select/pool/{{00000..{len(pool_urls) - 1:05d}}}.tar",
                f"s3://{BUCKET}/select/target/{{00000..{len(target_urls) - 1:05d}}}.tar",
                teacher.mlflow_run_id,
                tracking_uri,
                fractions[0],
                negclip_batch,
                repeats,
            ),
            "demo select",
        )
        outcome = run_selection(cfg)
        fs, path = filesystem(outcome.scores)
        scores = pq.read_table(io.BytesIO(fs.cat_file(path))).to_pandas()
        table = grade(scores, pool_spec, fractions, target_shapes)
        MlflowClient(tracking_uri).log_text(outcome.run_id, table, "demo_selection_table.txt")
        print("\n" + table)
        if train_steps:
            log.info("demo select: closed loop, %d steps on each of 3 subsets of %g", train_steps, fractions[0])
            loop = close_loop(
                outcome.scores,
                outcome.run_id,
                fractions[0],
                loop_base(exp, train_steps),
                f"{cfg.output}/closed_loop",
                samples_per_shard=SAMPLES_PER_SHARD,
            )
            print(f"\nclosed loop (MLflow experiment {LOOP_EXPERIMENT}):\n{loop.table}")
    print(
        f"\nteacher: run {teacher.run_name} ({teacher.metrics.get('zeroshot/shape/top1', float('nan')):.3f} "
        f"zero-shot shape top-1); selection: MLflow run {outcome.run_id}"
    )
    print(f"demo select finished in {(time.time() - started) / 60:.1f} min")
    print(f"open the MLflow UI:  {ui_hint(tracking_uri, outcome.run_id)}")
    return table


def loop_base(exp: Experiment, steps: int) -> dict[str, Any]:
    """The closed loop's experiment: the teacher's recipe and held-out set, `steps` long, in an MLflow experiment
    of its own."""
    tree = exp.model_dump(mode="json")
    tree["train"]["steps"] = steps
    tree["tracking"]["experiment"] = LOOP_EXPERIMENT
    return tree


def grade(scores: Any, pool_spec: SynthSpec, fractions: Sequence[float], target_shapes: Sequence[str]) -> str:
    """The table of every standard method at every fraction over the selection job's scores.parquet frame,
    and a last row for the job's own selection (negCLIPLoss then dedup) at the share of the pool it kept."""
    columns = {k: scores[k].to_numpy() for k in ("clipscore", "negclip", "normsim_inf") if k in scores}
    noisy = scores["noisy"].to_numpy() == 1
    in_target = np.isin(main_shapes(pool_spec, scores["key"].tolist()), list(target_shapes))
    normsim = columns.get("normsim_inf")
    rows = [
        evaluate(m, kept_mask(m, columns, len(scores)), noisy, in_target, normsim)
        for m in standard_methods(fractions, normsim is not None)
    ]
    job = scores["selected"].to_numpy()
    rows.append(evaluate(Method("negclip+dedup", round(float(job.mean()), 3)), job, noisy, in_target, normsim))
    return format_table(rows, float(noisy.mean()), float(in_target.mean()))
