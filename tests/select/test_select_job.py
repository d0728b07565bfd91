"""`cliplab select` end to end: SynthScenes on S3, a teacher named by an MLflow run, subset + scores + run."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cliplab.cli import main
from cliplab.select import uids as U


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
            "steps": [{"score": "negclip", "fraction": 0.3}, {"score": "normsim_inf", "fraction": 0.2}],
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
    assert "pool 29 samples; kept after each step: negclip: 8, normsim_inf: 5; selected 6" in printed

    fs = fsspec.filesystem("s3")
    subset = np.load(io.BytesIO(fs.cat_file(f"{out}/subset.npy".removeprefix("s3://"))))
    assert subset.dtype == np.dtype("u8,u8") and len(subset) == 6 and np.array_equal(np.sort(subset), subset)
    with fs.open(f"{out}/scores.parquet", "rb") as f:
        scores = pq.read_table(f).to_pandas()
    assert len(scores) == 29 and scores.uid.is_unique
    assert {"clipscore", "negclip", "normsim_inf", "normsim_2", "kept_1", "kept_2", "selected"} <= set(scores.columns)
    assert scores.kept_1.sum() == 8 and scores.kept_2.sum() == 5 and scores.selected.sum() == 5
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
    assert (m["select/kept_1_negclip"], m["select/kept_2_normsim_inf"], m["select/selected"]) == (8, 5, 6)
    assert 0 <= m["noisy/reject_precision"] <= 1 and 0 <= m["noisy/reject_recall"] <= 1
    assert run.data.tags["cliplab.subset_uri"] == f"{out}/subset.npy"
    assert (m["reshard/shards"], m["reshard/samples"], m["reshard/missing_uids"]) == (2, 5, 1)  # DFN's uid: not here
    assert run.data.tags["cliplab.reshard_shards"] == f"{out}/shards/{{00000..00001}}.tar"
    for stage in ("embed_pool", "embed_target", "load", "score_clipscore_normsim", "score_negclip"):
        assert m[f"speed/{stage}_samples_per_s"] > 0 and m[f"time/{stage}_s"] >= 0, stage
    assert m["speed/embed_pool_samples_per_s"] == pytest.approx(29 / m["time/embed_pool_s"])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"score_histograms.png", "score_scatter.png", "selection.yaml"} <= names
