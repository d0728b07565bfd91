"""Objectives register through the `cliplab.objectives` entry points: cliplab's own and a third party's alike."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

from cliplab.config import validate_tree
from cliplab.errors import ConfigError, InstallError
from cliplab.models.factory import build_model
from cliplab.objectives import registry
from cliplab.objectives.registry import ObjectiveSpec, build_objective, get_spec
from cliplab.train.engine import build_engine, contrastive_step
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny_model(context=8)
SCRATCH = '''
"""A third-party objective: CLIP's loss times a weight, refusing ZeRO-3 (to show a cross-field rule)."""

from pydantic import BaseModel, ConfigDict, Field

from cliplab.objectives.clip import ClipObjective
from cliplab.objectives.registry import ObjectiveSpec


class ScaledParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, gt=0)


class Scaled(ClipObjective):
    def __init__(self, weight):
        self.weight = weight

    def loss(self, feats, logit_scale, batch):
        total, terms = super().loss(feats, logit_scale, batch)
        return self.weight * total, {**terms, "weight": total.new_tensor(self.weight)}


def check(params, exp):
    if exp.deepspeed.zero_stage == 3:
        raise ValueError("objective scaled needs deepspeed.zero_stage <= 2")


SPEC = ObjectiveSpec(
    name="scaled",
    params=ScaledParams,
    build=lambda p: Scaled(p.weight),
    terms=lambda p, exp: ("loss_i2t", "loss_t2i", "weight"),
    check=check,
)
'''


@pytest.fixture
def scratch_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package `scratchobj` installed only as files plus its own dist-info naming the entry point."""
    (tmp_path / "scratchobj").mkdir()
    (tmp_path / "scratchobj" / "__init__.py").write_text(textwrap.dedent(SCRATCH))
    info = tmp_path / "scratchobj-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scratchobj\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[cliplab.objectives]\nscaled = scratchobj:SPEC\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    registry.registered.cache_clear()
    yield tmp_path
    registry.registered.cache_clear()
    sys.modules.pop("scratchobj", None)


def tree(objective: dict, zero: int = 2) -> dict:
    return {
        "name": "ep",
        "data": {"train_shards": "x/{0..1}.tar", "batch_size": 4},
        "model": {"config": TINY},
        "objective": objective,
        "optim": {"lr": 0.1, "warmup_steps": 0},
        "deepspeed": {"zero_stage": zero, "precision": "fp32"},
        "train": {"steps": 2},
        "scaling": {"num_workers": 1},
    }


def test_pyproject_names_every_builtin_spec_under_its_own_name() -> None:
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["cliplab.objectives"]
    assert set(eps) == {"clip", "mcd", "holistic"}
    for name, target in eps.items():
        module, attr = target.split(":")
        spec = getattr(importlib.import_module(module), attr)
        assert isinstance(spec, ObjectiveSpec) and spec.name == name


def test_scratch_package_objective_validates_and_trains_one_step(scratch_package: Path, process_group) -> None:
    exp = validate_tree(tree({"name": "scaled", "weight": 2.0}))
    assert get_spec("scaled").terms(exp.objective.params, exp) == ("loss_i2t", "loss_t2i", "weight")
    with pytest.raises(ConfigError, match=r"objective\.weight"):
        validate_tree(tree({"name": "scaled", "weight": -1}), "mine.yaml")
    with pytest.raises(ConfigError, match=r"mine\.yaml.*\n.*objective scaled needs deepspeed\.zero_stage <= 2"):
        validate_tree(tree({"name": "scaled"}, zero=3), "mine.yaml")

    model, _ = build_model(exp.model)
    engine = build_engine(model, exp, world_size=1)
    objective = build_objective(exp.objective.name, exp.objective.params)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, 16, 16, generator=g), "text": torch.randint(1, 400, (4, 8), generator=g)}
    before = engine.module.visual.conv1.weight.detach().clone()
    loss, terms = contrastive_step(engine, objective, [batch])
    assert terms["weight"].item() == 2.0
    assert loss.item() == pytest.approx(2.0 * (terms["loss_i2t"] + terms["loss_t2i"]).item() / 2, rel=1e-5)
    assert not torch.equal(before, engine.module.visual.conv1.weight)


def test_missing_builtin_entry_points_ask_for_a_reinstall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "entry_points", lambda group: [])
    registry.registered.cache_clear()
    try:
        with pytest.raises(InstallError, match=r"pip install -e \."):
            get_spec("clip")
    finally:
        registry.registered.cache_clear()


def test_unknown_objective_names_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"objective\.name: unknown objective 'nope'.*'clip'"):
        validate_tree(tree({"name": "nope"}))


def test_a_stale_egg_info_first_on_the_path_is_named(tmp_path: Path) -> None:
    """A cliplab.egg-info from an old in-tree build, earlier on sys.path than the install, hides the objectives."""
    stale = tmp_path / "cliplab.egg-info"
    stale.mkdir()
    (stale / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: cliplab\nVersion: 0.0.1\n")
    (stale / "entry_points.txt").write_text("[console_scripts]\ncliplab = cliplab.cli:main\n")
    probe = "from cliplab.objectives.registry import get_spec; get_spec('clip')"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "platform")])}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "InstallError" in proc.stderr
    assert str(stale) in proc.stderr and "delete that folder" in proc.stderr
