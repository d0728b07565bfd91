"""`cliplab select` end to end: SynthScenes on S3, a teacher named by an MLflow run, subset + scores + run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cliplab.cli import main
from cliplab.data.shards import expand_urls
from cliplab.select import uids as U
from cliplab.select.pool import embedding_matrix, index_pool, read_part


def test_select_cli_refuses_a_bad_config_before_starting(tmp_path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "pool": {"shards": "a"}, "teacher": {"export": "e"}, "outptu": "o"}))
    assert main(["select", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: invalid selection config" in err and "outptu: unknown key" in err and "output: required" in err


@pytest.mark.slow
def test_select_job_end_to_end(ray_local, synth_pool, teacher_export, mlflow_uri, tmp_path, capsys) -> None:
    client = MlflowClient(mlflow_uri)
    exp_id = client.create_experiment("teachers")
    source = client.create_run(exp_id, tags={"cliplab.model_uri": str(teacher_export)}).info.run_id
    extra = "ab" * 16
    U.save_subset(str(tmp_path / "dfn.npy"), [extra])
    out = f"s3://{synth_pool['bucket']}/select/run1"
    cfg = {
        "name": "synth-select",
        "pool": {"shards": synth_pool["spec"]},
        "teacher": {"run_id": source},
        "target": {"shards": synth_pool["target"][0]},
        "scores": {"negclip": {"batch_size": 8, "repeats": 2, "seed": 1}, "normsim_p": ["inf", 2]},
        "recipe": {
            "steps": [
                {"score": "negclip", "fraction": 0.3},
                {"score": "normsim_inf", "fraction": 0.2},
                {"dedup": {"threshold": DEDUP_COS, "clusters": 1}},
            ],
            "combine": [{"op": "union", "subset": str(tmp_path / "dfn.npy")}],
        },
        "output": out,
        "embed": {"actors": 1, "cpus_per_actor": 0.5, "cpus_per_read": 0.5, "batch_size": 8},
        "reshard": {"enabled": True, "samples_per_shard": 4},
        "tracking": {"tracking_uri": mlflow_uri},
    }
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["select", str(path)]) == 0
    printed = capsys.readouterr().out
    fs = fsspec.filesystem("s3")
    with fs.open(f"{out}/scores.parquet", "rb") as f:
        scores = pq.read_table(f).to_pandas()
    deduped = pairwise_dedup(out, synth_pool["spec"], scores[scores.kept_2], DEDUP_COS)
    k = len(deduped)
    assert f"pool 29 samples; kept after each step: negclip: 8, normsim_inf: 5, dedup: {k}; selected {k + 1}" in printed

    subset = np.load(io.BytesIO(fs.cat_file(f"{out}/subset.npy".removeprefix("s3://"))))
    assert subset.dtype == np.dtype("u8,u8") and len(subset) == 6 and np.array_equal(np.sort(subset), subset)
    assert len(scores) == 29 and scores.uid.is_unique
    assert {"clipscore", "negclip", "normsim_inf", "normsim_2", "kept_1", "kept_3", "selected"} <= set(scores.columns)
    assert (scores.kept_1.sum(), scores.kept_2.sum(), scores.kept_3.sum(), scores.selected.sum()) == (8, 5, k, k)
    assert set(scores.uid[scores.kept_3]) == deduped
    assert set(U.to_hex(subset)) == set(scores.uid[scores.selected]) | {extra}
    top = scores.sort_values(["negclip"], ascending=False, kind="stable").head(8)
    assert set(top.uid) == set(scores.uid[scores.kept_1])

    (run,) = client.search_runs([client.get_experiment_by_name("cliplab-select").experiment_id])
    assert run.info.status == "FINISHED"
    p, m = run.data.params, run.data.metrics
    assert (p["teacher"], p["tau_source"], p["negclip.K"], p["negclip.batch_size_used"]) == (
        str(teacher_export),
        "teacher",
        "2",
        "8",
    )
    assert float(p["tau"]) == pytest.approx(0.07, rel=1e-3) and p["pool_size"] == "29"
    assert (m["pool/size"], m["pool/skipped_samples"], m["pool/shards_unreadable"]) == (29, 1, 1)
    assert (m["select/kept_1_negclip"], m["select/kept_2_normsim_inf"], m["select/kept_3_dedup"]) == (8, 5, k)
    assert m["select/selected"] == k + 1 and p["step3.dedup.threshold"] == str(DEDUP_COS)
    assert 0 <= m["noisy/reject_precision"] <= 1 and 0 <= m["noisy/reject_recall"] <= 1
    assert run.data.tags["cliplab.subset_uri"] == f"{out}/subset.npy"
    assert (m["reshard/samples"], m["reshard/missing_uids"]) == (k, 1)  # DFN's uid: not in the pool
    spec = f"{out}/shards/{{00000..{(k - 1) // 4:05d}}}.tar"
    assert m["reshard/shards"] == (k + 3) // 4 and run.data.tags["cliplab.reshard_shards"] == spec
    for stage in ("embed_pool", "embed_target", "load", "score_clipscore_normsim", "score_negclip"):
        assert m[f"speed/{stage}_samples_per_s"] > 0 and m[f"time/{stage}_s"] >= 0, stage
    assert m["speed/embed_pool_samples_per_s"] == pytest.approx(29 / m["time/embed_pool_s"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"score_histograms.png", "score_scatter.png", "selection.yaml", "manifest.json", "subset.npy"} <= names
    logged = client.download_artifacts(run.info.run_id, "subset.npy", str(tmp_path))
    assert np.array_equal(np.load(logged), subset)

    manifest = json.loads(fs.cat_file(f"{out}/manifest.json".removeprefix("s3://")))
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "manifest.json", str(tmp_path))).read_text())
    assert logged == manifest and manifest["mlflow_run_id"] == run.info.run_id
    assert manifest["pool"] == {
        "shards": synth_pool["spec"],
        "shard_count": 4,
        "samples": 29,
        "skipped_samples": 1,
        "unreadable_shards": manifest["pool"]["unreadable_shards"],
    }
    assert len(manifest["pool"]["unreadable_shards"]) == 1
    assert [s.get("score", "dedup") for s in manifest["recipe"]] == ["negclip", "normsim_inf", "dedup"]
    assert [s["kept"] for s in manifest["recipe"]] == [8, 5, k] and manifest["selected"] == k + 1
    assert manifest["recipe"][2]["dedup"]["threshold"] == DEDUP_COS
    assert (manifest["teacher"], manifest["tau_source"], manifest["negclip"]["K"]) == (
        str(teacher_export),
        "teacher",
        2,
    )
    assert manifest["target"] == {"shards": synth_pool["target"][0], "files_per_task": 1000}
    assert manifest["outputs"]["subset"] == f"{out}/subset.npy" and manifest["outputs"]["shards"] == spec
    assert manifest["outputs"]["embeddings_target"] == f"{out}/embeddings/target"


DEDUP_COS = 0.99


def pairwise_dedup(out: str, pool_spec: str, rows: pd.DataFrame, threshold: float) -> set[str]:
    """The dedup rule with one cluster, by brute force over `rows`: no earlier-ranked row at cosine >= threshold."""
    index = index_pool(f"{out}/embeddings/pool", expand_urls(pool_spec), "pool")
    emb = {}
    for part in index.parts:
        table = read_part(index.out, part, ["uid", "image_emb"])
        for u, e in zip(table.column("uid").to_pylist(), embedding_matrix(table.column("image_emb")), strict=True):
            emb[u] = e.astype(np.float32)
    ranked = [u for _, _, u in sorted(zip(-rows.clipscore.astype(float), rows.index, rows.uid, strict=True))]
    return {u for i, u in enumerate(ranked) if all(emb[u] @ emb[v] < threshold for v in ranked[:i])}
