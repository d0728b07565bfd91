"""The selection YAML: defaults are the paper's recipe; unknown keys and bad values name file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cliplab.errors import ConfigError
from cliplab.select.config import load_selection

BASE = {
    "name": "sel",
    "pool": {"shards": "s3://b/pool/{00000..00003}.tar"},
    "teacher": {"export": "s3://b/runs/r1/export"},
    "target": {"shards": "/data/target/{0..1}.tar"},
    "output": "s3://b/select/sel",
}


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "select.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_are_the_papers_recipe(tmp_path) -> None:
    cfg = load_selection(write(tmp_path, BASE))
    assert [(s.score, s.fraction) for s in cfg.recipe.steps] == [("negclip", 0.3), ("normsim_inf", 0.2)]
    assert (cfg.scores.negclip.batch_size, cfg.scores.negclip.repeats) == (32768, 10)
    assert cfg.scores.tau is None  # the teacher's own temperature
    assert cfg.scores.names(True) == ["clipscore", "negclip", "normsim_inf"]


def test_overrides_and_p_values(tmp_path) -> None:
    cfg = load_selection(
        write(tmp_path, BASE), ["scores.normsim_p=[inf, 2]", "scores.negclip.batch_size=64", "embed.gpus_per_actor=1"]
    )
    assert cfg.scores.names(True) == ["clipscore", "negclip", "normsim_inf", "normsim_2"]
    assert cfg.scores.negclip.batch_size == 64 and cfg.embed.gpus_per_actor == 1


def test_actor_pools_take_a_gpu_where_the_cluster_has_one_unless_told(tmp_path) -> None:
    cfg = load_selection(write(tmp_path, BASE))
    for pool in (cfg.embed, cfg.score):
        assert pool.gpus_per_actor is None and (pool.gpus(True), pool.gpus(False)) == (1.0, 0.0)
    cpu = load_selection(write(tmp_path, BASE), ["embed.gpus_per_actor=0", "score.gpus_per_actor=0"])
    assert cpu.embed.gpus(True) == cpu.score.gpus(True) == 0.0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"pool": {"shards": "x", "captionkey": "txt"}}, "pool.captionkey: unknown key"),
        (
            {"pool": {"shards": "s3://b/{0..2}.tar s3://b/1.tar"}},
            "pool.shards: names shards more than once",
        ),
        (
            {"teacher": {"export": "a", "run_id": "b"}},
            "teacher: give exactly one of name, export or run_id",
        ),
        ({"teacher": {"name": "ViT-B-32"}}, "teacher: name needs checkpoint"),
        ({"scores": {"negclip": {"repeats": 0}}}, "scores.negclip.repeats"),
        ({"scores": {"tau": -1}}, "scores.tau"),
        ({"scores": {"normsim_p": [0.5]}}, "scores.normsim_p"),
        ({"recipe": {"steps": [{"score": "negclip", "fraction": 1.5}]}}, "recipe.steps.0.fraction"),
        ({"recipe": {"steps": [{"score": "negclip"}]}}, "recipe.steps.0: give exactly one"),
        ({"recipe": {"combine": [{"op": "xor", "subset": "a.npy"}]}}, "recipe.combine.0.op"),
        ({"embed": {"actors": 0}}, "embed.actors"),
        ({"target": None}, "recipe.steps[1].score 'normsim_inf' is not computed"),
        ({"target": {"shards": "t.tar", "images": "/imgs"}}, "target: give exactly one of shards or images"),
        ({"target": {"files_per_task": 10}}, "target: give exactly one of shards or images"),
        ({"recipe": {"steps": [{"dedup": {}, "fraction": 0.5}]}}, "recipe.steps.0: a dedup step takes no fraction"),
        (
            {"recipe": {"steps": [{"score": "negclip", "fraction": 0.5, "dedup": {}}]}},
            "recipe.steps.0: give exactly one of score",
        ),
        ({"recipe": {"steps": [{"dedup": {"threshold": 1.5}}]}}, "recipe.steps.0.dedup.threshold"),
        ({"recipe": {"steps": [{"dedup": {"clusters": 0}}]}}, "recipe.steps.0.dedup.clusters"),
        (
            {"recipe": {"steps": [{"dedup": {"rank_by": "normsim_2"}}]}},
            "recipe.steps[0].dedup.rank_by 'normsim_2' is not computed",
        ),
        ({"output": None}, "output"),
    ],
)
def test_bad_configs_name_file_and_field(tmp_path, change: dict, field: str) -> None:
    path = write(tmp_path, {**BASE, **change})
    with pytest.raises(ConfigError) as err:
        load_selection(path)
    assert str(path) in str(err.value) and field in str(err.value), str(err.value)


def test_a_dedup_step_and_an_image_folder_target_parse(tmp_path) -> None:
    steps = [{"score": "negclip", "fraction": 0.3}, {"dedup": {"threshold": 0.9, "rank_by": "negclip"}}]
    tree = {**BASE, "target": {"images": "s3://b/downstream/"}, "recipe": {"steps": steps}}
    cfg = load_selection(write(tmp_path, tree))
    dedup = cfg.recipe.steps[1]
    assert (dedup.label, dedup.needs, dedup.dedup.clusters, dedup.dedup.threshold) == ("dedup", "negclip", 100, 0.9)
    assert dedup.describe() == "dedup cos >= 0.9 in 100 clusters (by negclip)"
    assert (cfg.target.images, cfg.target.shards, cfg.target.files_per_task) == ("s3://b/downstream/", None, 1000)


def test_secrets_and_missing_files_are_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="secrets are never read"):
        load_selection(write(tmp_path, {**BASE, "pool": {"shards": "x", "aws_secret_access_key": "k"}}))
    with pytest.raises(ConfigError, match="no such config file"):
        load_selection(tmp_path / "nope.yaml")


def test_the_documented_config_validates(tmp_path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "data-selection.md").read_text()
    block = doc.split("A selection config", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = load_selection(write(tmp_path, yaml.safe_load(block)))
    assert cfg.teacher.export and cfg.target and not cfg.reshard.enabled
