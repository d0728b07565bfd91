"""The closed loop: three equal-size subsets of a scored pool, resharded and trained as sibling MLflow runs."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from cliplab.data.pipeline import read_shard
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.errors import ConfigError
from cliplab.select import uids as U
from cliplab.select.closeloop import METHODS, check_base, close_loop, subset_indices
from cliplab.tracking.mlflow import local_artifact_root

MODEL = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def scored_pool(bucket: str) -> tuple[str, pa.Table]:
    """A 40-sample SynthScenes pool on S3 and a scores.parquet over it (seeded scores, as the job writes them)."""
    urls = write_synthscenes(
        f"s3://{bucket}/pool", SynthSpec(num_samples=40, samples_per_shard=10, image_size=32, noisy_fraction=0.3)
    )
    rows = [
        (U.sample_uid(json.loads(raw["json"]), url, raw["__key__"]), raw["__key__"], url)
        for url in urls
        for raw in read_shard(url, [])
    ]
    rng = np.random.default_rng(5)
    table = pa.table(
        {
            "uid": [r[0] for r in rows],
            "key": [r[1] for r in rows],
            "shard": [r[2] for r in rows],
            "clipscore": rng.normal(size=len(rows)).astype(np.float32),
            "negclip": rng.normal(size=len(rows)).astype(np.float32),
        }
    )
    url = f"s3://{bucket}/select/scores.parquet"
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fsspec.filesystem("s3").pipe_file(url.removeprefix("s3://"), buf.getvalue())
    return url, table


def base_tree(bucket: str, mlflow_uri: str, tmp_path) -> dict:
    return {
        "name": "loop",
        "data": {
            "train_shards": "unused: replaced per subset",
            "val_shards": f"s3://{bucket}/val/00000.tar",
            "batch_size": 4,
            "num_workers": 1,
            "shuffle_buffer": 8,
            "image_size": 32,
        },
        "model": {"config": MODEL},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "train": {"steps": 2, "log_every": 1, "checkpoint_every": 2},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "tracking": {"tracking_uri": mlflow_uri, "experiment": "closed-loop", "log_model": False},
        "eval": {
            "every_steps": 2,
            "max_samples": 16,
            "batch_size": 16,
            "zeroshot": [{"name": "colour", "label_field": "labels.colour", "classnames": COLOURS}],
        },
    }


def test_closed_loop_refuses_what_it_cannot_compare(tmp_path) -> None:
    scores = pa.table({"uid": ["0" * 32] * 3, "clipscore": [0.1, 0.2, 0.3]})
    with pytest.raises(ConfigError, match=re.escape("fraction must keep at least one of the 3 pool samples, got 0.2")):
        subset_indices(scores, 0.2, seed=0)
    with pytest.raises(ConfigError, match=r"no \['negclip'\] column"):
        subset_indices(scores, 0.5, seed=0)
    tree = base_tree("b", "sqlite:///x.db", tmp_path)
    del tree["data"]["val_shards"], tree["eval"]
    with pytest.raises(ConfigError, match=r"data\.val_shards: required"):
        check_base(tree)
    tree = base_tree("b", "sqlite:///x.db", tmp_path)
    del tree["eval"]["every_steps"]
    with pytest.raises(ConfigError, match=r"eval\.every_steps: required"):
        check_base(tree)


@pytest.mark.slow
def test_closed_loop_trains_equal_subsets_as_sibling_runs(ray_local, s3_bucket, mlflow_uri, tmp_path) -> None:
    scores_url, table = scored_pool(s3_bucket)
    write_synthscenes(f"s3://{s3_bucket}/val", SynthSpec(num_samples=16, samples_per_shard=16, image_size=32, seed=7))
    client = MlflowClient(mlflow_uri)
    selection = client.create_run(client.create_experiment("select", local_artifact_root(mlflow_uri))).info.run_id
    prefix = f"s3://{s3_bucket}/select/closed_loop"

    loop = close_loop(scores_url, selection, 0.5, base_tree(s3_bucket, mlflow_uri, tmp_path), prefix, seed=3)

    frame = table.to_pandas()
    k = math.floor(0.5 * len(frame))
    expected = {
        "negclip": set(frame.sort_values("negclip", ascending=False, kind="stable").uid[:k]),
        "clipscore": set(frame.sort_values("clipscore", ascending=False, kind="stable").uid[:k]),
        "random": set(frame.uid[np.random.default_rng(3).choice(len(frame), k, replace=False)]),
    }
    assert expected["negclip"] != expected["clipscore"]
    again = subset_indices(table, 0.5, seed=3)["random"]
    assert set(frame.uid[again]) == expected["random"] != set(frame.uid[subset_indices(table, 0.5, seed=4)["random"]])
    fs = fsspec.filesystem("s3")
    for method in METHODS:
        with fs.open(f"{prefix}/{method}/manifest.parquet", "rb") as f:
            manifest = pq.read_table(f).to_pandas()
        assert len(manifest) == k and set(manifest.uid) == expected[method], method

    runs = client.search_runs([client.get_experiment_by_name("closed-loop").experiment_id])
    assert sorted(r.data.tags["cliplab.subset"] for r in runs) == sorted(METHODS)
    for run in runs:
        method = run.data.tags["cliplab.subset"]
        assert run.info.status == "FINISHED" and run.data.tags["cliplab.selection_run"] == selection
        assert run.data.params["subset.size"] == str(k) and run.data.params["train.steps"] == "2"
        assert run.data.params["data.train_shards"] == f"{prefix}/{method}/00000.tar"
        assert run.data.params["data.val_shards"] == f"s3://{s3_bucket}/val/00000.tar"
        for key in ("zeroshot/colour/top1", "retrieval/i2t_R1", "retrieval/t2i_R1"):
            assert 0 <= run.data.metrics[key] <= 1, (method, key)
    assert [r.method for r in loop.runs] == list(METHODS) and {r.size for r in loop.runs} == {k}
    assert {r.run_id for r in loop.runs} == {r.info.run_id for r in runs}
    lines = loop.table.splitlines()
    header = ["method", "kept", "size", "zeroshot/colour/top1", "retrieval/i2t_R1", "retrieval/t2i_R1"]
    assert lines[0].split() == header
    assert [line.split()[0] for line in lines[1:4]] == list(METHODS)
    report = Path(client.download_artifacts(selection, "closed_loop.md", str(tmp_path)))
    assert loop.table in report.read_text()
