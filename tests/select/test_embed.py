"""The Ray Data embedding pass on SynthScenes shards on S3: skips counted, outputs complete, resumable."""

from __future__ import annotations

import fsspec
import pyarrow.parquet as pq
import pytest

from cliplab.data.shards import expand_urls
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
