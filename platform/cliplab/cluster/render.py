"""`cliplab cluster render CONFIG`: a KubeRay RayJob (ray.io/v1) for an experiment, sweep or evaluation.

The RayCluster part starts from `cluster/raycluster.yaml` and takes from the experiment config what decides
the cluster's shape: the image, how many GPU workers a node holds (`--gpus-per-node` over
`scaling.gpus_per_worker`), how many nodes the job needs (`scaling.num_workers`, times `max_concurrent` trials
for a sweep) and each node's CPU and GPU limits. CPU-only experiments get CPU nodes. The job runs the
`jobs/` entrypoint from the image's copy of the repository (`APP_DIR`, the Dockerfile's WORKDIR).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from cliplab.config import Experiment, load_experiment, validate_tree
from cliplab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = ROOT / "cluster" / "raycluster.yaml"
APP_DIR = "/home/ray/cliplab"
ENTRYPOINTS = {"train": "jobs/train.py", "sweep": "jobs/sweep.py", "evaluate": "jobs/evaluate.py"}


def _experiment(kind: str, config: Path) -> tuple[Experiment, int]:
    """The experiment whose scaling sizes the cluster, and how many of its jobs run at once."""
    if kind != "sweep":
        return load_experiment(config), 1
    from cliplab.sweep.config import load_sweep

    sweep, tree = load_sweep(config)
    return validate_tree(tree, str(config)), sweep.max_concurrent or 1


def _size_workers(group: dict[str, Any], exp: Experiment, jobs_at_once: int, gpus_per_node: int) -> None:
    s = exp.scaling
    container = group["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    if s.use_gpu:
        per_node = max(1, gpus_per_node // int(s.gpus_per_worker))
        gpus = min(s.num_workers, per_node) * int(s.gpus_per_worker)
        limits["nvidia.com/gpu"] = str(gpus)
    else:
        per_node = s.num_workers
        limits.pop("nvidia.com/gpu", None)
        group["template"]["spec"].pop("tolerations", None)
        group["groupName"] = "cpu-workers"
    workers_on_node = min(s.num_workers, per_node)
    cpus = math.ceil(workers_on_node * s.cpus_per_worker + 2)  # + data-loader and Ray overhead
    limits["cpu"] = str(cpus)
    container["resources"]["requests"] = dict(limits)
    nodes = math.ceil(s.num_workers / per_node)
    group["replicas"] = nodes
    group["minReplicas"] = 0
    group["maxReplicas"] = nodes * jobs_at_once


def render(kind: str, config: str, image: str, gpus_per_node: int = 8, extra: list[str] | None = None,
           active_deadline_s: int = 7 * 24 * 3600) -> dict[str, Any]:
    """The RayJob manifest (a dict) for `kind` of CONFIG (a path inside the repository)."""
    if kind not in ENTRYPOINTS:
        raise ConfigError(f"cluster render: kind must be one of {sorted(ENTRYPOINTS)}, got {kind!r}")
    path = Path(config).resolve()
    try:
        relative = path.relative_to(ROOT)
    except ValueError:
        raise ConfigError(f"{config}: render a config inside the repository ({ROOT}); the image holds that copy") \
            from None
    exp, jobs_at_once = _experiment(kind, path)
    cluster = yaml.safe_load(TEMPLATE.read_text())
    spec = copy.deepcopy(cluster["spec"])
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            container["image"] = image
    _size_workers(spec["workerGroupSpecs"][0], exp, jobs_at_once, gpus_per_node)
    command = " ".join(["python", ENTRYPOINTS[kind], "--config", str(relative), *(extra or [])])
    name = f"cliplab-{kind}-{exp.name}".lower().replace("_", "-").replace(".", "-")[:63].rstrip("-")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "cliplab", "cliplab/kind": kind}},
        "spec": {
            "entrypoint": f"cd {APP_DIR} && {command}",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 0,  # a retry would start a new cluster and a new run; resume with --resume instead
            "activeDeadlineSeconds": active_deadline_s,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": spec,
        },
    }


def render_yaml(manifest: dict[str, Any], header: str) -> str:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    return "\n".join(lines) + "\n" + yaml.safe_dump(manifest, sort_keys=False, width=120)
