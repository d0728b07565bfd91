"""Every manifest in cluster/ validates against the KubeRay v1.7.0 CRD schemas vendored in cluster/crds/.

Validation closes every object schema (as Kubernetes' strict field validation does) and drops `required` keys
that the server defaults: see `cliplab.cluster.crds`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from cliplab.cluster import crds

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "cluster" / "crds"


def errors(doc: dict) -> list[str]:
    return crds.errors(doc, CRD_DIR)


MANIFESTS = sorted(p for p in ROOT.glob("cluster/**/*.yaml") if CRD_DIR not in p.parents)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_validates_against_the_crd(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc["apiVersion"] == "ray.io/v1"
        assert errors(doc) == []


def test_an_invalid_manifest_fails() -> None:
    doc = yaml.safe_load((ROOT / "cluster" / "raycluster.yaml").read_text())
    bad = copy.deepcopy(doc)
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "2"
    bad["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "512GB"
    bad["spec"]["headGroupSpec"]["rayStartParms"] = {}
    found = "\n".join(errors(bad))
    assert "replicas" in found and "memory" in found and "rayStartParms" in found


def test_images_and_versions_match_the_pinned_ray() -> None:
    import ray

    doc = yaml.safe_load((ROOT / "cluster" / "raycluster.yaml").read_text())
    assert doc["spec"]["rayVersion"] == ray.__version__
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in dockerfile


RENDERED = {
    "rayjob-train.yaml": ("train", "configs/holistic_vitb16.yaml", []),
    "rayjob-sweep.yaml": ("sweep", "configs/sweep_mcd_weights_cluster.yaml", []),
    "rayjob-evaluate.yaml": (
        "evaluate",
        "configs/holistic_vitb16.yaml",
        ["--model", "s3://my-bucket/cliplab-runs/RUN_NAME/export"],
    ),
    "rayjob-select.yaml": ("select", "configs/select/negclip_normsim_gpu.yaml", []),
}
EXPERIMENTS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("sweep_"))


def _render(kind: str, config: str, extra: list[str]) -> dict:
    from cliplab.cluster.render import render

    return render(kind, str(ROOT / config), "cliplab:2.60.0-py311-gpu", 8, extra, repo=ROOT)


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_committed_rayjobs_are_what_render_makes(name: str) -> None:
    kind, config, extra = RENDERED[name]
    assert yaml.safe_load((ROOT / "cluster" / name).read_text()) == _render(kind, config, extra), (
        f"cluster/{name} is stale: cliplab cluster render {config} --kind {kind} {' '.join(extra)} > cluster/{name}"
    )


@pytest.mark.parametrize(
    "config", [*EXPERIMENTS, *sorted((ROOT / "configs").glob("sweep_*.yaml"))], ids=lambda p: p.name
)
def test_every_rendered_rayjob_validates(config: Path) -> None:
    kind = "sweep" if config.name.startswith("sweep_") else "train"
    doc = _render(kind, str(config.relative_to(ROOT)), [])
    assert errors(doc) == []
    workers = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] >= 1 and workers["maxReplicas"] >= workers["replicas"]
    for key in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "backoffLimit", "activeDeadlineSeconds"):
        assert key in doc["spec"]


def test_render_sizes_the_worker_group_from_scaling() -> None:
    doc = _render("train", "configs/holistic_vitb16.yaml", [])  # 8 workers x 1 GPU, 8 CPUs each
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["replicas"] == 1 and limits["nvidia.com/gpu"] == "8" and limits["cpu"] == "66"
    cpu = _render("train", "configs/demo.yaml", [])["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cpu["groupName"] == "cpu-workers"
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_the_vendored_crds_are_kuberay_v1_7_0_with_their_licence() -> None:
    notice = (CRD_DIR / "README.md").read_text()
    assert "v1.7.0" in notice and "Apache-2.0" in notice
    assert "Apache License" in (CRD_DIR / "LICENSE").read_text()
    for kind, name in crds.CRD_FILES.items():
        crd = yaml.load((CRD_DIR / name).read_text(), Loader=crds.Loader)
        assert crd["spec"]["names"]["kind"] == kind and crd["spec"]["group"] == "ray.io"


def test_render_refuses_a_template_that_makes_an_invalid_rayjob(tmp_path: Path) -> None:
    import shutil

    from cliplab.cluster.render import render
    from cliplab.errors import ConfigError

    repo = tmp_path / "repo"
    for part in ("pyproject.toml", "jobs", "cluster", "configs", "platform/cliplab/__init__.py"):
        target = repo / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, target)
    template = yaml.safe_load((repo / "cluster" / "raycluster.yaml").read_text())
    template["spec"]["headGroupSpec"]["rayStartParms"] = {}
    (repo / "cluster" / "raycluster.yaml").write_text(yaml.safe_dump(template))
    with pytest.raises(
        ConfigError, match=r"raycluster.yaml: the rendered RayJob is not valid KubeRay: .*rayStartParms"
    ):
        render("train", str(repo / "configs" / "demo.yaml"), "img", repo=repo)


def test_an_invalid_rayjob_fails() -> None:
    doc = _render("train", "configs/holistic_vitb16.yaml", [])
    doc["spec"]["shutdownAfterJobFinishes"] = "yes"
    doc["spec"]["ttlSecondsAfterFinnished"] = 60
    found = "\n".join(errors(doc))
    assert "shutdownAfterJobFinishes" in found and "ttlSecondsAfterFinnished" in found


@pytest.mark.parametrize("path", sorted(ROOT.glob("cluster/rayjob-*.yaml")), ids=lambda p: p.name)
def test_entrypoints_and_configs_named_in_manifests_exist(path: Path) -> None:
    entrypoint = yaml.safe_load(path.read_text())["spec"]["entrypoint"]
    named = re.findall(r"(?:jobs|configs)/[\w./-]+", entrypoint)
    assert any(n.startswith("jobs/") for n in named) and any(n.startswith("configs/") for n in named), entrypoint
    for relative in named:
        assert (ROOT / relative).is_file(), f"{path.name} names {relative}, which is not in the repository"


def test_dockerfile_runs_as_non_root_and_bakes_in_no_secrets() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert not re.search(r"^(ENV|ARG)\s+\S*(SECRET|KEY|TOKEN|PASSWORD)", dockerfile, re.MULTILINE | re.IGNORECASE)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git"} <= set(ignored)


def test_an_evaluation_asks_for_one_workers_node_share_not_the_training_jobs() -> None:
    """Evaluation is one Ray task of a training worker's size: one GPU, and memory and /dev/shm to match."""
    doc = _render("evaluate", "configs/holistic_vitb16.yaml", ["--model", "s3://b/runs/r/export"])
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["replicas"] == group["maxReplicas"] == 1
    assert limits == {"cpu": "10", "memory": "60Gi", "nvidia.com/gpu": "1"}  # 8 CPUs per worker + 2
    assert group["template"]["spec"]["volumes"][0]["emptyDir"]["sizeLimit"] == "8Gi"
    assert errors(doc) == []


def test_fractional_gpus_per_worker_share_nodes_and_oversized_workers_are_refused() -> None:
    from cliplab.cluster.render import TEMPLATE, _size_workers
    from cliplab.config import validate_tree
    from cliplab.errors import ConfigError

    tree = yaml.safe_load((ROOT / "configs" / "holistic_vitb16.yaml").read_text())

    def sized(gpus_per_worker: float, workers: int) -> dict:
        exp = validate_tree({**tree, "scaling": {**tree["scaling"], "gpus_per_worker": gpus_per_worker}}, "test")
        group = yaml.safe_load((ROOT / TEMPLATE).read_text())["spec"]["workerGroupSpecs"][0]
        _size_workers(group, exp, workers, 1, 8)
        return group

    half = sized(0.5, 20)  # 16 workers on an 8-GPU node: 2 nodes
    assert half["replicas"] == 2
    assert half["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    with pytest.raises(ConfigError, match=r"scaling.gpus_per_worker: 16 GPUs per worker cannot be placed"):
        sized(16, 1)
