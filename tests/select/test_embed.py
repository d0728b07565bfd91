"""The Ray Data embedding pass on SynthScenes shards on S3: skips counted, outputs complete, resumable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import yaml

from cliplab.data.shards import expand_urls
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.select.config import EmbedConfig
from cliplab.select.embed import embed_shards, output_paths
from cliplab.select.pool import embedding_matrix, index_pool, read_meta, read_part
from cliplab.select.teacher import TeacherSource, inspect


@pytest.mark.slow
def test_embed_pass_counts_skips_and_resumes_without_recompute(ray_local, synth_pool, teacher_export):
    urls = expand_urls(synth_pool["spec"])
    out = f"s3://{synth_pool['bucket']}/select/embeddings/pool"
    teacher = inspect(TeacherSource(export=str(teacher_export)))
    cfg = EmbedConfig(actors=1, cpus_per_actor=0.5, cpus_per_read=0.5, batch_size=8)

    first = embed_shards(urls, out, teacher, cfg)
    assert (first.samples, first.skipped_samples) == (29, 1)  # 30 written, one garbage jpg
    assert first.unreadable == [urls[3]] and sorted(first.written) == sorted(urls[:3])
    pool = index_pool(out, urls, "pool")
    meta = read_meta(pool)
    uids = meta.column("uid").to_pylist()
    assert len(uids) == len(set(uids)) == 29 == len(pool)
    image = embedding_matrix(read_part(out, pool.parts[0], ["image_emb"]).column("image_emb"))
    assert image.shape == (10, 16) and str(image.dtype) == "float16"
    assert set(meta.column("noisy").to_pylist()) == {0, 1}

    # an interruption: shard 2's marker never got written and its parquet was left half-written
    fs = fsspec.filesystem("s3")
    parquet, marker = output_paths(out, urls[2])
    fs.rm(marker)
    fs.pipe_file(parquet, fs.cat_file(parquet)[:100])
    before = {u: fs.info(output_paths(out, u)[0])["LastModified"] for u in urls[:2]}

    second = embed_shards(urls, out, teacher, cfg)
    assert sorted(second.resumed) == sorted(urls[:2]) and second.written == [urls[2]]
    assert {u: fs.info(output_paths(out, u)[0])["LastModified"] for u in urls[:2]} == before
    assert (second.samples, second.skipped_samples, second.unreadable) == (29, 1, [urls[3]])
    again = read_meta(index_pool(out, urls, "pool"))
    assert again.column("uid").to_pylist() == uids  # same rows in the same pool order
    with fs.open(parquet, "rb") as f:
        assert pq.read_table(f).num_rows == 10


@pytest.mark.slow
def test_a_killed_selection_resumes_without_recomputing_a_finished_shard(teacher_export, tmp_path):
    """`cliplab select` SIGKILLed mid-embedding, run again: finished shards stay as written, every uid once."""
    shards = 24
    spec = SynthSpec(num_samples=10 * shards, samples_per_shard=10, image_size=32, noisy_fraction=0.3, seed=5)
    urls = write_synthscenes(str(tmp_path / "pool"), spec)
    out = tmp_path / "out"
    config = tmp_path / "select.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "killed",
                "pool": {"shards": f"{tmp_path}/pool/{{00000..{shards - 1:05d}}}.tar"},
                "teacher": {"export": str(teacher_export)},
                "scores": {"negclip": {"batch_size": 16, "repeats": 2}},
                "recipe": {"steps": [{"score": "negclip", "fraction": 0.5}]},
                "output": str(out),
                "embed": {"actors": 1, "cpus_per_actor": 0.5, "cpus_per_read": 0.5, "batch_size": 2},
                "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            }
        )
    )
    cmd = [sys.executable, "-m", "cliplab.cli", "select", str(config)]
    outputs = [output_paths(str(out / "embeddings" / "pool"), u) for u in urls]
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not any(Path(marker).exists() for _, marker in outputs):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finished = {p: Path(p).stat().st_mtime_ns for p, marker in outputs if Path(marker).exists()}
    assert 1 <= len(finished) < shards, "the kill came after the embedding pass"

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert {p: Path(p).stat().st_mtime_ns for p in finished} == finished  # not one finished shard recomputed
    scores = pq.read_table(out / "scores.parquet").to_pandas()
    assert len(scores) == 10 * shards and scores.uid.is_unique
    assert sorted(scores.key) == [f"{i:09d}" for i in range(10 * shards)]  # SynthScenes keys: the sample index
