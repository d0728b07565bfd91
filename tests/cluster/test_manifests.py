"""Every manifest in cluster/ validates against the KubeRay v1.7.0 CRD schemas in ../shared/kuberay-crds/.

The CRDs' openAPIV3Schema does not forbid unknown fields (the API server prunes them or, with strict field
validation, refuses them), so objects that list `properties` are closed here, as Kubernetes' strict
validation would; `required` keys that have a server-side default are dropped, since the server fills them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _strict(node: object) -> object:
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        props = node.get("properties")
        if isinstance(props, dict):
            if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            defaults = {k for k, v in props.items() if isinstance(v, dict) and "default" in v}
            if "required" in node:
                node["required"] = [r for r in node["required"] if r not in defaults] or None
                if node["required"] is None:
                    del node["required"]
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / KINDS[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft4Validator(schema(doc["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


MANIFESTS = sorted(ROOT.glob("cluster/**/*.yaml"))


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
