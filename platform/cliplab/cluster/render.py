"""`cliplab cluster render CONFIG`: a KubeRay RayJob (ray.io/v1) for an experiment, sweep, evaluation or selection.

The RayCluster part starts from the checkout's `cluster/raycluster.yaml` (the checkout holding the working
directory, or `--repo`) and takes from the experiment config what decides
the cluster's shape: the image, how many GPU workers a node holds (`--gpus-per-node` over
`scaling.gpus_per_worker`), how many nodes the job needs (`scaling.num_workers`, times `max_concurrent` trials
for a sweep; one worker's worth for an evaluation, which runs as one task) and each node's CPU and GPU limits.
CPU-only experiments get CPU nodes. A selection job (`--kind select`, a selection YAML) is sized from its
`embed` section instead: nodes for `embed.actors` teacher actors of `embed.gpus_per_actor` GPUs each (see
`cliplab.cluster.select_size`). The job runs the
`jobs/` entrypoint from the image's copy of the repository (`APP_DIR`, the Dockerfile's WORKDIR). The manifest is
validated against the KubeRay CRDs in `cluster/crds/` before it is returned.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import yaml

from cliplab.cluster import crds
from cliplab.cluster.repo import find_repo
from cliplab.config import Experiment, load_experiment, validate_tree
from cliplab.errors import ConfigError
from cliplab.resources import worker_resources

TEMPLATE = Path("cluster") / "raycluster.yaml"
CRD_DIR = Path("cluster") / "crds"
APP_DIR = "/home/ray/cliplab"
ENTRYPOINTS = {
    "train": "jobs/train.py",
    "sweep": "jobs/sweep.py",
    "evaluate": "jobs/evaluate.py",
    "select": "jobs/select.py",
}


def _experiment(kind: str, config: Path) -> tuple[Experiment, int]:
    """The experiment whose scaling sizes the cluster, and how many of its jobs run at once."""
    if kind != "sweep":
        return load_experiment(config), 1
    from cliplab.sweep.config import load_sweep

    sweep, tree = load_sweep(config)
    return validate_tree(tree, str(config)), sweep.max_concurrent or 1


def _scaled(quantity: str, share: float) -> str:
    """`480Gi` times `share`, rounded up to whole Gi (the template's memory quantities are in Gi)."""
    if not quantity.endswith("Gi"):
        raise ConfigError(f"{TEMPLATE}: memory quantities must be in Gi to be sized, got {quantity!r}")
    return f"{max(1, math.ceil(float(quantity[:-2]) * share))}Gi"


def _size_workers(group: dict[str, Any], exp: Experiment, workers: int, jobs_at_once: int, gpus_per_node: int) -> None:
    """Nodes, and each node's limits, for `workers` Ray workers of the experiment's size (per job at once)."""
    s = exp.scaling
    container = group["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    template_gpus, template_cpus = int(limits["nvidia.com/gpu"]), int(limits["cpu"])
    if s.use_gpu:
        if not 0 < s.gpus_per_worker <= gpus_per_node:
            raise ConfigError(
                f"scaling.gpus_per_worker: {s.gpus_per_worker:g} GPUs per worker cannot be placed on "
                f"nodes of {gpus_per_node} GPUs (--gpus-per-node)"
            )
        per_node = math.floor(gpus_per_node / s.gpus_per_worker)
    else:
        per_node = workers
        limits.pop("nvidia.com/gpu", None)
        group["template"]["spec"].pop("tolerations", None)
        group["groupName"] = "cpu-workers"
    node = worker_resources(s, min(workers, per_node), extra_cpus=2)  # + data-loader and Ray overhead
    if s.use_gpu:
        limits["nvidia.com/gpu"] = str(math.ceil(node["GPU"]))
    cpus = math.ceil(node["CPU"])
    limits["cpu"] = str(cpus)
    # memory and the /dev/shm volume scale with this node's GPUs (CPUs) over the template node's
    share = int(limits["nvidia.com/gpu"]) / template_gpus if s.use_gpu else cpus / template_cpus
    scale_node(group, share, math.ceil(workers / per_node), jobs_at_once)


def scale_node(group: dict[str, Any], share: float, nodes: int, jobs_at_once: int = 1) -> None:
    """Memory and /dev/shm times `share` of the template node's, requests = limits, and the replica counts."""
    container = group["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    limits["memory"] = _scaled(limits["memory"], share)
    for volume in group["template"]["spec"].get("volumes", []):
        if volume.get("emptyDir", {}).get("sizeLimit"):
            volume["emptyDir"]["sizeLimit"] = _scaled(volume["emptyDir"]["sizeLimit"], share)
    container["resources"]["requests"] = dict(limits)
    group["replicas"] = nodes
    group["minReplicas"] = 0
    group["maxReplicas"] = nodes * jobs_at_once


def render(
    kind: str,
    config: str,
    image: str,
    gpus_per_node: int = 8,
    extra: list[str] | None = None,
    active_deadline_s: int = 7 * 24 * 3600,
    repo: str | Path | None = None,
) -> dict[str, Any]:
    """The RayJob manifest (a dict) for `kind` of CONFIG (a path inside the cliplab checkout `repo`)."""
    if kind not in ENTRYPOINTS:
        raise ConfigError(f"cluster render: kind must be one of {sorted(ENTRYPOINTS)}, got {kind!r}")
    root = find_repo(repo)
    path = Path(os.path.abspath(config))  # a symlinked config keeps its own path
    try:
        relative = path.relative_to(root)
    except ValueError:
        raise ConfigError(
            f"{config}: render a config inside the repository ({root}); the image holds that copy"
        ) from None
    cluster = yaml.safe_load((root / TEMPLATE).read_text())
    spec = copy.deepcopy(cluster["spec"])
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            container["image"] = image
    if kind == "select":
        from cliplab.cluster.select_size import check_score_fits, size_embed_workers
        from cliplab.select.config import load_selection

        selection = load_selection(path)
        job_name = selection.name
        size_embed_workers(spec["workerGroupSpecs"][0], selection.embed, gpus_per_node)
        check_score_fits(spec["workerGroupSpecs"][0], selection.score)
    else:
        exp, jobs_at_once = _experiment(kind, path)
        job_name = exp.name
        workers = 1 if kind == "evaluate" else exp.scaling.num_workers  # evaluation is one task of a worker's size
        _size_workers(spec["workerGroupSpecs"][0], exp, workers, jobs_at_once, gpus_per_node)
    command = " ".join(["python", ENTRYPOINTS[kind], "--config", str(relative), *(extra or [])])
    name = f"cliplab-{kind}-{job_name}".lower().replace("_", "-").replace(".", "-")[:63].rstrip("-")
    manifest = {
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
    problems = crds.errors(manifest, root / CRD_DIR)
    if problems:
        raise ConfigError(f"{root / TEMPLATE}: the rendered RayJob is not valid KubeRay: " + "; ".join(problems[:5]))
    return manifest


def render_yaml(manifest: dict[str, Any], header: str) -> str:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    return "\n".join(lines) + "\n" + yaml.safe_dump(manifest, sort_keys=False, width=120)
