"""Validate manifests against the KubeRay CRD schemas vendored in `cluster/crds/` (KubeRay v1.7.0).

A CRD's openAPIV3Schema does not forbid unknown fields (the API server prunes them or, with strict field
validation, refuses them), so every object schema that lists `properties` is closed here, as Kubernetes'
strict validation would; `required` keys that have a server-side default are dropped, since the server fills
them in.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _strict(node: Any) -> Any:
    """The schema with closed objects and server-defaulted keys no longer required."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _strict(v) for k, v in node.items()}
    props = node.get("properties")
    if isinstance(props, dict):
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        defaulted = {k for k, v in props.items() if isinstance(v, dict) and "default" in v}
        required = [r for r in node.get("required", []) if r not in defaulted]
        node.pop("required", None)
        if required:
            node["required"] = required
    return node


@functools.cache
def schema(crd_dir: Path, kind: str) -> dict[str, Any]:
    """The strict ray.io/v1 schema of `kind` (RayCluster or RayJob) from `crd_dir`."""
    crd = yaml.load((crd_dir / CRD_FILES[kind]).read_text(), Loader=Loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def errors(doc: dict[str, Any], crd_dir: Path) -> list[str]:
    """Every schema violation of the manifest `doc`, as `dotted.path: message`."""
    if doc.get("kind") not in CRD_FILES:
        return [f"kind: expected one of {sorted(CRD_FILES)}, got {doc.get('kind')!r}"]
    validator = jsonschema.Draft4Validator(schema(crd_dir, doc["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(doc)]
