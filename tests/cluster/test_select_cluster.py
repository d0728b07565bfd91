"""`cluster render --kind select` and `cliplab submit select`: a RayJob sized from the selection config's `embed`
section and valid KubeRay, and the job command and runtime env that go to the job server (a fake client here)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cliplab.cli import main
from cliplab.cluster import crds
from cliplab.cluster.render import TEMPLATE, render
from cliplab.cluster.select_size import check_score_fits, size_embed_workers
from cliplab.cluster.submit import entrypoint
from cliplab.errors import ConfigError
from cliplab.select.config import EmbedConfig, ScoreConfig

ROOT = Path(__file__).resolve().parents[2]
GPU_CONFIG = "configs/select/negclip_normsim_gpu.yaml"
CPU_CONFIG = "tests/cluster/select_tiny.yaml"


def _workers(doc: dict) -> tuple[dict, dict]:
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    return group, group["template"]["spec"]["containers"][0]["resources"]["limits"]


def _template_group() -> dict:
    return copy.deepcopy(yaml.safe_load((ROOT / TEMPLATE).read_text())["spec"]["workerGroupSpecs"][0])


def test_gpu_selection_gets_nodes_for_its_teacher_actors() -> None:
    doc = render("select", str(ROOT / GPU_CONFIG), "img", 8, repo=ROOT)  # 16 actors x 1 GPU, 2 + 4 CPUs each
    assert crds.errors(doc, ROOT / "cluster" / "crds") == []
    assert doc["spec"]["entrypoint"].endswith(f"python jobs/select.py --config {GPU_CONFIG}")
    assert doc["metadata"]["name"] == "cliplab-select-negclip-normsim-medium"
    group, limits = _workers(doc)
    assert (group["replicas"], group["maxReplicas"]) == (2, 2)
    assert limits == {"cpu": "50", "memory": "480Gi", "nvidia.com/gpu": "8"}  # 8 x (2 + 4) + 2 CPUs
    four = render("select", str(ROOT / GPU_CONFIG), "img", 4, repo=ROOT)  # nodes of 4 GPUs: 4 nodes
    group, limits = _workers(four)
    assert group["replicas"] == 4 and limits["nvidia.com/gpu"] == "4" and limits["memory"] == "240Gi"


def test_cpu_selection_gets_one_cpu_node_without_gpus() -> None:
    doc = render("select", str(ROOT / CPU_CONFIG), "img", 8, repo=ROOT)  # 3 CPU actors, 1 + 1 CPUs each
    assert crds.errors(doc, ROOT / "cluster" / "crds") == []
    group, limits = _workers(doc)
    assert group["groupName"] == "cpu-workers" and group["replicas"] == 1
    assert limits == {"cpu": "8", "memory": "60Gi"}  # 8 of the template node's 64 CPUs: 8/64 of its 480Gi
    assert "tolerations" not in group["template"]["spec"]


def test_memory_per_actor_raises_node_memory_and_oversized_actors_are_refused() -> None:
    group = _template_group()
    size_embed_workers(group, EmbedConfig(actors=8, gpus_per_actor=1, memory_per_actor_gb=64), 8)
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["memory"] == resources["requests"]["memory"] == "732Gi"  # 8 x 64 / 0.7
    with pytest.raises(ConfigError, match=r"embed.gpus_per_actor: 16 GPUs per actor cannot be placed"):
        size_embed_workers(_template_group(), EmbedConfig(gpus_per_actor=16), 8)
    with pytest.raises(ConfigError, match=r"embed.cpus_per_actor \+ embed.cpus_per_read: 80 CPUs per actor"):
        size_embed_workers(_template_group(), EmbedConfig(cpus_per_actor=40, cpus_per_read=40), 8)


def test_scoring_actors_beyond_the_embedding_group_are_refused() -> None:
    group = _template_group()
    size_embed_workers(group, EmbedConfig(actors=8, gpus_per_actor=1), 8)  # one node: 8 GPUs, 8 x 2 + 2 CPUs
    check_score_fits(group, ScoreConfig(actors=8, cpus_per_actor=1))  # one GPU each by default: fits
    with pytest.raises(ConfigError, match=r"score.actors: 9 actors of 1 GPUs need more than the 8 GPUs"):
        check_score_fits(group, ScoreConfig(actors=9, cpus_per_actor=1))
    with pytest.raises(ConfigError, match=r"score.actors: 4 actors of 8 CPUs .* need more than the 16 CPUs"):
        check_score_fits(group, ScoreConfig(actors=4, cpus_per_actor=8, gpus_per_actor=0))


def test_render_refuses_an_invalid_selection_config(tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "repo"
    for part in ("pyproject.toml", "jobs", "cluster", "platform/cliplab/__init__.py"):
        (repo / part).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, repo / part)
    bad = repo / "bad_select.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "pool": {"shards": "a.tar"}, "teacher": {"export": "e"}}))
    with pytest.raises(ConfigError, match=r"bad_select.yaml: invalid selection config\n  output: required"):
        render("select", str(bad), "img", repo=repo)


def test_select_entrypoint_is_the_select_job() -> None:
    command = entrypoint(ROOT, "select", str(ROOT / CPU_CONFIG), ["embed.actors=2"], [])
    assert command == f"python jobs/select.py --config {CPU_CONFIG} --set=embed.actors=2"
    assert (ROOT / "jobs" / "select.py").is_file()


def test_submit_select_refuses_a_bad_selection_before_uploading(capsys, monkeypatch) -> None:
    """Refused by validation, before any client is made (the address answers nothing, which would read otherwise)."""
    monkeypatch.chdir(ROOT)
    assert main(["submit", "select", CPU_CONFIG, "--address", "http://127.0.0.1:1", "--set", "embed.actors=0"]) == 2
    err = capsys.readouterr().err
    assert "invalid selection config" in err and "no Ray job server answers" not in err
