"""The worker group of a selection RayJob (`cluster render --kind select`), sized from the config's `embed`.

The embedding pass sizes the group; the scoring pass after it reuses these workers, so a `score` section
asking for more CPUs or GPUs than the group holds is refused (`check_score_fits`). Embedding runs
`embed.actors` teacher actors, each with `gpus_per_actor` GPUs (unset: none, since no cluster exists yet
to look at; a job on it then finds no GPUs either) and `cpus_per_actor` CPUs, fed by
read+decode tasks of `cpus_per_read` CPUs each. A node holds as many actors as its GPUs allow
(`--gpus-per-node`; CPU teachers: as many as the template node's CPUs allow), plus one read task's CPUs per
actor so that decoding keeps each actor busy, plus 2 CPUs for Ray.
Memory and /dev/shm scale with the node's share of the template node, and with `memory_per_actor_gb` the
node's memory is at least the actors' heap over 70% (Ray gives 30% of a node's memory to the object store).
"""

from __future__ import annotations

import math
from typing import Any

from cliplab.cluster.render import scale_node
from cliplab.errors import ConfigError
from cliplab.select.config import EmbedConfig, ScoreConfig

OVERHEAD_CPUS = 2  # Ray's own processes on the node
HEAP_SHARE = 0.7  # of a node's memory, what the object store leaves to tasks and actors


def size_embed_workers(group: dict[str, Any], embed: EmbedConfig, gpus_per_node: int) -> None:
    """Set the worker group's node count and per-node limits for the embedding pass of `embed`."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    template_gpus, template_cpus = int(limits["nvidia.com/gpu"]), int(limits["cpu"])
    cpus_per_slot = embed.cpus_per_actor + embed.cpus_per_read
    gpus = embed.gpus(cluster_has_gpus=False)  # no cluster exists yet: unset sizes CPU nodes
    if gpus > 0:
        if gpus > gpus_per_node:
            raise ConfigError(
                f"embed.gpus_per_actor: {gpus:g} GPUs per actor cannot be placed on nodes of "
                f"{gpus_per_node} GPUs (--gpus-per-node)"
            )
        per_node = math.floor(gpus_per_node / gpus)
    else:
        per_node = math.floor((template_cpus - OVERHEAD_CPUS) / cpus_per_slot)
        if per_node < 1:
            raise ConfigError(
                f"embed.cpus_per_actor + embed.cpus_per_read: {cpus_per_slot:g} CPUs per actor cannot be placed "
                f"on nodes of {template_cpus} CPUs ({OVERHEAD_CPUS} kept for Ray)"
            )
    on_node = min(embed.actors, per_node)
    cpus = math.ceil(on_node * cpus_per_slot + OVERHEAD_CPUS)
    limits["cpu"] = str(cpus)
    if gpus > 0:
        limits["nvidia.com/gpu"] = str(math.ceil(on_node * gpus))
        share = int(limits["nvidia.com/gpu"]) / template_gpus
    else:
        limits.pop("nvidia.com/gpu", None)
        group["template"]["spec"].pop("tolerations", None)
        group["groupName"] = "cpu-workers"
        share = cpus / template_cpus
    scale_node(group, share, math.ceil(embed.actors / per_node))
    if embed.memory_per_actor_gb:
        need = math.ceil(on_node * embed.memory_per_actor_gb / HEAP_SHARE)
        resources = group["template"]["spec"]["containers"][0]["resources"]
        if need > int(limits["memory"].removesuffix("Gi")):
            limits["memory"] = f"{need}Gi"
            resources["requests"] = dict(limits)


def check_score_fits(group: dict[str, Any], score: ScoreConfig) -> None:
    """Refuse a `score` section whose actors need more CPUs or GPUs than the sized worker group has."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    nodes, gpus = group["replicas"], int(limits.get("nvidia.com/gpu", 0))
    per_actor_gpus = score.gpus(gpus > 0)
    have_cpus = nodes * (int(limits["cpu"]) - OVERHEAD_CPUS)
    if score.actors * score.cpus_per_actor + score.cpus_per_read > have_cpus:
        raise ConfigError(
            f"score.actors: {score.actors} actors of {score.cpus_per_actor:g} CPUs (plus a read task of "
            f"{score.cpus_per_read:g}) need more than the {have_cpus} CPUs of the {nodes} worker node(s) that "
            "embed sizes; lower score.actors or score.cpus_per_actor"
        )
    if score.actors * per_actor_gpus > nodes * gpus:
        raise ConfigError(
            f"score.actors: {score.actors} actors of {per_actor_gpus:g} GPUs need more than the {nodes * gpus} "
            "GPUs of the worker group that embed sizes; lower score.actors or score.gpus_per_actor"
        )
