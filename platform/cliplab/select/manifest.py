"""The selection's manifest: one JSON file that says what was selected from what, by which teacher, and where it is.

Written next to `subset.npy` as `manifest.json` and logged with it to the MLflow run, so a subset
found in either place can be traced back to its pool, teacher, scoring parameters and recipe without
reading the run's params.
"""

from __future__ import annotations

import json
import time
from typing import Any

from cliplab.data.shards import filesystem
from cliplab.select.config import SelectConfig

VERSION = 1


def build_manifest(
    cfg: SelectConfig,
    run_id: str,
    teacher: str,
    tau: float,
    tau_source: str,
    pool: dict[str, Any],
    negclip: dict[str, Any],
    steps: list[dict[str, Any]],
    selected: int,
    outputs: dict[str, str | None],
) -> dict[str, Any]:
    """The manifest as a dict: `pool` and `steps` carry the counts, `outputs` the URI of every output.

    `negclip` is the scoring pass's `negclip.*` params (the batch size and window actually used).
    """
    nc = cfg.scores.negclip
    used = {k.removeprefix("negclip."): v for k, v in negclip.items() if k.startswith("negclip.")}
    return {
        "manifest_version": VERSION,
        "selection": cfg.name,
        "mlflow_run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pool": {"shards": cfg.pool.shards, **pool},
        "target": cfg.target.model_dump(mode="json", exclude_none=True) if cfg.target else None,
        "teacher": teacher,
        "tau": tau,
        "tau_source": tau_source,
        "scores": cfg.scores.names(cfg.target is not None),
        "negclip": {"K": nc.repeats, "batch_size": nc.batch_size, "seed": nc.seed, **used} if nc else None,
        "normsim_p": cfg.scores.normsim_p if cfg.target else [],
        "recipe": steps,
        "combine": [c.model_dump(mode="json") for c in cfg.recipe.combine],
        "selected": selected,
        "outputs": outputs,
    }


def write_manifest(url: str, manifest: dict[str, Any]) -> bytes:
    """Write the manifest (local or s3://) and return the bytes written."""
    data = json.dumps(manifest, indent=2).encode()
    fs, path = filesystem(url)
    fs.pipe_file(path, data)
    return data
