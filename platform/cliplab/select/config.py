"""The selection job's YAML schema (`cliplab select CONFIG`): pool, teacher, target, scores, recipe, outputs.

Strict like the experiment schema (cliplab.config): unknown keys and bad values are refused before
Ray starts, with the file and the dotted field in the message; credential-like keys are refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from cliplab.config import Strict, _describe, apply_overrides, check_tree, read_yaml
from cliplab.data.shards import expand_urls
from cliplab.errors import ConfigError, DataError

WINDOW_BATCHES = 8  # negCLIPLoss draws batches inside windows of at least this many |B| rows


class PoolConfig(Strict):
    """The candidate pool: WebDataset shards (brace lists, s3://, file:// or local paths)."""

    shards: str
    caption_key: str = Field("txt", description="sample field holding the caption")

    @field_validator("shards")
    @classmethod
    def _distinct(cls, v: str) -> str:
        try:
            urls = expand_urls(v)
        except DataError as exc:
            raise ValueError(str(exc)) from None
        repeated = sorted({u for u in urls if urls.count(u) > 1})
        if repeated:
            raise ValueError(f"names shards more than once (their samples would count twice): {repeated[:3]}")
        return v


class TeacherConfig(Strict):
    """The frozen teacher: exactly one of an open_clip name (+ local checkpoint), a cliplab export, an MLflow run."""

    name: str | None = Field(None, description="open_clip model name, e.g. ViT-L-14")
    checkpoint: str | None = Field(None, description="with name: local open_clip checkpoint file")
    export: str | None = Field(None, description="a cliplab export dir (<storage>/<run>/export), local or s3://")
    run_id: str | None = Field(None, description="MLflow run whose cliplab.model_uri tag names an export")

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        given = [k for k in ("name", "export", "run_id") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of name, export or run_id (got {given or 'none'})")
        if self.name is not None and self.checkpoint is None:
            raise ValueError("name needs checkpoint (a local open_clip checkpoint file; nothing is downloaded)")
        if self.checkpoint is not None and self.name is None:
            raise ValueError("checkpoint goes with name; exports and runs carry their own")
        return self


class TargetConfig(Strict):
    """Downstream images for NormSim (spec eq. 4-5), embedded by the same teacher: shards or an image folder."""

    shards: str | None = Field(None, description="WebDataset shards (captions optional)")
    images: str | None = Field(None, description="a folder of .jpg/.jpeg/.png/.webp files, local or s3://, recursive")
    files_per_task: int = Field(1000, gt=0, description="with images: files per read task (one embedding output)")

    @model_validator(mode="after")
    def _one_source(self) -> TargetConfig:
        if (self.shards is None) == (self.images is None):
            raise ValueError("give exactly one of shards or images")
        return self


class NegClipConfig(Strict):
    """negCLIPLoss (spec eq. 3): K random partitions of the pool into batches of |B|."""

    batch_size: int = Field(32768, gt=1, description="|B|; capped at the pool size (then deterministic)")
    repeats: int = Field(10, ge=1, description="K partitions averaged")
    seed: int = 0
    window_batches: int = Field(
        WINDOW_BATCHES, ge=1, description="batches are drawn inside windows of >= this many |B| (the memory unit)"
    )


class ScoresConfig(Strict):
    """Which scores to compute. CLIPScore is always computed; NormSim needs `target`."""

    tau: float | None = Field(None, gt=0, description="temperature; default the teacher's 1/exp(logit_scale)")
    negclip: NegClipConfig | None = Field(default_factory=NegClipConfig, description="null to skip")
    normsim_p: list[float | Literal["inf"]] = Field(default_factory=lambda: ["inf"], description="p values")

    @field_validator("normsim_p")
    @classmethod
    def _p(cls, v: list[float | str]) -> list[float | str]:
        for p in v:
            if p != "inf" and p < 1:
                raise ValueError(f"NormSim p must be >= 1 or inf, got {p}")
        return v

    def names(self, with_target: bool) -> list[str]:
        """Score column names: clipscore, negclip, normsim_inf, normsim_2, ..."""
        out = ["clipscore"] + (["negclip"] if self.negclip else [])
        return out + ([normsim_name(p) for p in self.normsim_p] if with_target else [])


def normsim_name(p: float | str) -> str:
    return "normsim_inf" if p == "inf" or p == math.inf else f"normsim_{float(p):g}"


class DedupConfig(Strict):
    """Near-duplicate removal (SemDeDup style, select/dedup.py) on the teacher's image embeddings of the survivors."""

    threshold: float = Field(0.95, gt=0, le=1, description="cosine from which a sample duplicates an earlier one")
    clusters: int = Field(100, ge=1, description="k-means clusters; duplicates are looked for within a cluster")
    rank_by: str = Field("clipscore", description="score ranking a cluster: the best-scored copy is kept")
    sample: int = Field(100_000, ge=2, description="survivors sampled to fit the centroids")
    iterations: int = Field(20, ge=1, description="k-means (Lloyd) iterations")
    seed: int = 0


class StepConfig(Strict):
    """One recipe step: top `fraction` of the whole pool (spec ambiguity 3) or `threshold` on a `score`; or `dedup`."""

    score: str | None = None
    fraction: float | None = Field(None, gt=0, le=1)
    threshold: float | None = None
    dedup: DedupConfig | None = None

    @model_validator(mode="after")
    def _one(self) -> StepConfig:
        if (self.score is None) == (self.dedup is None):
            raise ValueError("give exactly one of score (with fraction or threshold) or dedup")
        if self.dedup is not None and (self.fraction, self.threshold) != (None, None):
            raise ValueError("a dedup step takes no fraction or threshold (its own is dedup.threshold)")
        if self.score is not None and (self.fraction is None) == (self.threshold is None):
            raise ValueError("give exactly one of fraction or threshold")
        return self

    @property
    def label(self) -> str:
        """The step's name in metrics and logs: its score, or `dedup`."""
        return self.score or "dedup"

    @property
    def needs(self) -> str:
        """The score the step reads: its own, or the one ranking a dedup cluster."""
        return self.score or self.dedup.rank_by

    def describe(self) -> str:
        """One readable phrase, e.g. `negclip top 0.3` or `dedup cos >= 0.95 in 100 clusters`."""
        if self.dedup is not None:
            d = self.dedup
            return f"dedup cos >= {d.threshold} in {d.clusters} clusters (by {d.rank_by})"
        return f"{self.score} {'top ' + str(self.fraction) if self.fraction else '>= ' + str(self.threshold)}"


class CombineConfig(Strict):
    """Set algebra of the selection with a subset file (DataComp format, e.g. DFN's uids)."""

    op: Literal["union", "intersection", "difference"]
    subset: str = Field(description=".npy subset file, local or s3://")


class RecipeConfig(Strict):
    """The default is the paper's: top 30% by negCLIPLoss, then NormSim_inf down to 20% of the pool."""

    steps: list[StepConfig] = Field(
        default_factory=lambda: [
            StepConfig(score="negclip", fraction=0.3),
            StepConfig(score="normsim_inf", fraction=0.2),
        ],
        min_length=1,
    )
    combine: list[CombineConfig] = Field(default_factory=list)


class ActorPoolConfig(Strict):
    """What the embedding and the scoring actor pools share: their GPU rule."""

    gpus_per_actor: float | None = Field(None, ge=0, description="unset: 1 if the Ray cluster has GPUs, else 0")

    def gpus(self, cluster_has_gpus: bool) -> float:
        """GPUs per actor: `gpus_per_actor`, or when unset 1 on a cluster with GPUs, else 0 (CPU actors)."""
        if self.gpus_per_actor is not None:
            return self.gpus_per_actor
        return 1.0 if cluster_has_gpus else 0.0


class EmbedConfig(ActorPoolConfig):
    """The Ray Data embedding pass: read tasks per shard, the teacher in an actor pool."""

    actors: int = Field(1, ge=1, description="teacher actors (one GPU each on a cluster with GPUs, by default)")
    cpus_per_actor: float = Field(1.0, gt=0)
    batch_size: int = Field(256, gt=0, description="images per teacher forward")
    cpus_per_read: float = Field(1.0, gt=0, description="CPUs per read+decode task (one per shard)")
    memory_per_actor_gb: float | None = Field(None, gt=0, description="heap to reserve per actor (Ray budgets none)")


class ScoreConfig(ActorPoolConfig):
    """The Ray Data scoring pass: read tasks per shard output, CLIPScore/NormSim and negCLIPLoss in actor pools."""

    actors: int = Field(1, ge=1, description="scoring actors per stage (each loads the target once)")
    cpus_per_actor: float = Field(1.0, gt=0)
    batch_size: int = Field(8192, gt=0, description="rows per CLIPScore/NormSim actor call")
    cpus_per_read: float = Field(1.0, gt=0, description="CPUs per read task (one per shard output)")
    memory_per_actor_gb: float | None = Field(None, gt=0, description="heap to reserve per actor (Ray budgets none)")


class ReshardConfig(Strict):
    """Write the selected samples as new WebDataset shards (members copied byte for byte)."""

    enabled: bool = False
    samples_per_shard: int = Field(10000, gt=0)


class SelectTracking(Strict):
    """MLflow for selection runs: URI (MLFLOW_TRACKING_URI wins), experiment, run name, artifact root."""

    tracking_uri: str | None = None
    experiment: str = "cliplab-select"
    run_name: str | None = None
    artifact_location: str | None = Field(None, description="artifact root for a new experiment, e.g. s3://b/mlflow")


class SelectConfig(Strict):
    """A whole selection job."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    pool: PoolConfig
    teacher: TeacherConfig
    target: TargetConfig | None = None
    scores: ScoresConfig = Field(default_factory=ScoresConfig)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    output: str = Field(description="output folder, local or s3://; embeddings are kept there for resuming")
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    reshard: ReshardConfig = Field(default_factory=ReshardConfig)
    tracking: SelectTracking = Field(default_factory=SelectTracking)

    @model_validator(mode="after")
    def _recipe_scores(self) -> SelectConfig:
        have = self.scores.names(self.target is not None)
        for i, step in enumerate(self.recipe.steps):
            if step.needs not in have:
                field = "score" if step.score else "dedup.rank_by"
                hint = " (NormSim needs a target)" if step.needs.startswith("normsim") else ""
                raise ValueError(f"recipe.steps[{i}].{field} {step.needs!r} is not computed; computed: {have}{hint}")
        return self


def validate_selection(tree: Any, source: str = "<config>") -> SelectConfig:
    """Validate a raw tree into a SelectConfig; errors name the source and the dotted field."""
    check_tree(tree, source)
    try:
        return SelectConfig.model_validate(tree)
    except ValidationError as exc:
        msg = _describe(exc, source).replace("invalid experiment config", "invalid selection config")
        raise ConfigError(msg.replace("`cliplab config schema`", "`cliplab select --schema`")) from None


def load_selection(path: str | Path, overrides: list[str] | None = None) -> SelectConfig:
    """Read a selection YAML, apply `--set` overrides, validate."""
    path = Path(path)
    tree = apply_overrides(read_yaml(path), overrides or [])
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return validate_selection(tree, source)
