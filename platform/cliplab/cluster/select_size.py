"""The worker group of a selection RayJob (`cluster render --kind select`), sized from the config's `embed`.

The embedding pass sizes the group (the scoring pass after it reuses these workers; keep `score.actors`
within them): `embed.actors` teacher actors, each with `gpus_per_actor` GPUs and `cpus_per_actor` CPUs, fed
by read+decode tasks of `cpus_per_read` CPUs each. A node holds as many actors as its GPUs allow
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
from cliplab.select.config import EmbedConfig

OVERHEAD_CPUS = 2  # Ray's own processes on the node
HEAP_SHARE = 0.7  # of a node's memory, what the object store leaves to tasks and actors


def size_embed_workers(group: dict[str, Any], embed: EmbedConfig, gpus_per_node: int) -> None:
    """Set the worker group's node count and per-node limits for the embedding pass of `embed`."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    template_gpus, template_cpus = int(limits["nvidia.com/gpu"]), int(limits["cpu"])
    cpus_per_slot = embed.cpus_per_actor + embed.cpus_per_read
    if embed.gpus_per_actor > 0:
        if embed.gpus_per_actor > gpus_per_node:
            raise ConfigError(
                f"embed.gpus_per_actor: {embed.gpus_per_actor:g} GPUs per actor cannot be placed on nodes of "
                f"{gpus_per_node} GPUs (--gpus-per-node)"
            )
        per_node = math.floor(gpus_per_node / embed.gpus_per_actor)
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
    if embed.gpus_per_actor > 0:
        limits["nvidia.com/gpu"] = str(math.ceil(on_node * embed.gpus_per_actor))
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
