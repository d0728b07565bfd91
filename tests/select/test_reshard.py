"""Resharding a subset: members byte for byte, uid multiplicity kept, img2dataset stats, parallel Ray tasks."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cliplab.data.pipeline import read_shard
from cliplab.data.shards import expand_urls
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.select import uids as U
from cliplab.select.reshard import plan, reshard


def pool_meta(urls: list[str]) -> tuple[pa.Table, dict[str, dict]]:
    rows, raw_by_uid = [], {}
    for url in urls:
        for raw in read_shard(url, []):
            uid = U.sample_uid(json.loads(raw["json"]), url, raw["__key__"])
            rows.append((uid, raw["__key__"], url))
            raw_by_uid[uid] = {k: v for k, v in raw.items() if not k.startswith("__")}
    table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(("uid", "key", "shard"))})
    return table, raw_by_uid


def test_plan_cuts_pool_order_into_equal_shards() -> None:
    meta = pa.table({"uid": [f"{i:032x}" for i in range(6)], "key": list("abcdef"), "shard": ["s0"] * 3 + ["s1"] * 3})
    subset = U.to_pairs([f"{i:032x}" for i in (1, 2, 2, 4, 5)] + ["f" * 32])
    shards, missing = plan(meta, subset, 2)
    assert missing == 1
    assert shards == [
        [("s0", [("b", f"{1:032x}"), ("c", f"{2:032x}")])],
        [("s0", [("c", f"{2:032x}")]), ("s1", [("e", f"{4:032x}")])],
        [("s1", [("f", f"{5:032x}")])],
    ]


@pytest.mark.slow
def test_reshard_copies_members_and_keeps_multiplicity(ray_local, tmp_path) -> None:
    urls = write_synthscenes(str(tmp_path / "pool"), SynthSpec(num_samples=12, samples_per_shard=5, image_size=16))
    meta, raw_by_uid = pool_meta(urls)
    uids = meta.column("uid").to_pylist()
    subset = U.to_pairs([uids[1], uids[6], uids[6], uids[11], uids[3]])
    result = reshard(meta, subset, str(tmp_path / "out"), samples_per_shard=2)
    assert (len(result.urls), result.samples, result.missing_uids) == (3, 5, 0)
    assert result.spec == f"{tmp_path / 'out'}/{{00000..00002}}.tar"

    seen = []
    for url in expand_urls(result.spec):
        for raw in read_shard(url, []):
            uid = U.sample_uid(json.loads(raw["json"]), url, raw["__key__"])
            assert {k: v for k, v in raw.items() if not k.startswith("__")} == raw_by_uid[uid]  # byte for byte
            seen.append(uid)
        stats = json.loads((tmp_path / "out" / (url.rsplit("/", 1)[1][:-4] + "_stats.json")).read_text())
        assert stats["successes"] == stats["count"] > 0
    assert seen == [uids[1], uids[3], uids[6], uids[6], uids[11]]  # pool order, the repeated uid twice
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert [m["uid"] for m in manifest] == seen and manifest[0]["source_shard"] == urls[0]

    reshard(meta, U.to_pairs([uids[0]]), str(tmp_path / "out"), samples_per_shard=2)  # a smaller plan replaces it
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar"]
