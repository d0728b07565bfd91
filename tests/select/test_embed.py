"""The Ray Data embedding pass on SynthScenes shards and image folders on S3: skips counted, resumable."""

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

from cliplab.data.pipeline import read_shard
from cliplab.data.shards import expand_urls
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.errors import DataError
from cliplab.select.config import EmbedConfig
from cliplab.select.embed import embed_shards, output_paths
from cliplab.select.image_folder import image_chunks
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
@pytest.mark.usefixtures("mlflow_uri")  # the store at tmp_path/mlflow.db, schema made once
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


@pytest.mark.slow
def test_a_target_image_folder_embeds_as_its_images_do_in_shards(ray_local, synth_pool, teacher_export) -> None:
    fs = fsspec.filesystem("s3")
    shard = synth_pool["target"][0]
    folder = f"s3://{synth_pool['bucket']}/target-images"
    keys = []
    for i, raw in enumerate(read_shard(shard, [])):
        fs.pipe_file(f"{folder}/part{i % 2}/{raw['__key__']}.JPG".removeprefix("s3://"), raw["jpg"])
        keys.append(raw["__key__"])
    fs.pipe_file(f"{folder}/broken.png".removeprefix("s3://"), b"not a png")
    fs.pipe_file(f"{folder}/notes.txt".removeprefix("s3://"), b"not an image")
    chunks = image_chunks(folder, 4)
    assert [len(f) for f in chunks.values()] == [4, 4, 1]  # 9 images in sorted order, the txt left out
    teacher = inspect(TeacherSource(export=str(teacher_export)))
    cfg = EmbedConfig(actors=1, cpus_per_actor=0.5, cpus_per_read=0.5, batch_size=8)
    out = f"s3://{synth_pool['bucket']}/select/embeddings"

    stats = embed_shards(list(chunks), f"{out}/folder", teacher, cfg, "txt", True, "target", chunks)
    assert (stats.samples, stats.skipped_samples, stats.unreadable) == (len(keys), 1, [])
    embed_shards([shard], f"{out}/shards", teacher, cfg, "txt", True, "target")

    def by_key(index) -> dict[str, list[float]]:
        rows = {}
        for part in index.parts:
            table = read_part(index.out, part, ["key", "image_emb"])
            image = embedding_matrix(table.column("image_emb"))
            names = table.column("key").to_pylist()
            rows.update({k.rsplit("/", 1)[-1]: v.tolist() for k, v in zip(names, image, strict=True)})
        return rows

    from_folder = by_key(index_pool(f"{out}/folder", list(chunks), "target"))
    assert from_folder == by_key(index_pool(f"{out}/shards", [shard], "target")) and sorted(from_folder) == sorted(keys)
    again = embed_shards(list(chunks), f"{out}/folder", teacher, cfg, "txt", True, "target", chunks)
    assert sorted(again.resumed) == sorted(chunks) and not again.written
    with pytest.raises(DataError, match=r"target\.images: .*/nowhere: no such folder"):
        image_chunks(f"s3://{synth_pool['bucket']}/nowhere", 4)
