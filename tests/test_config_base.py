"""Experiment files may name a `base:` file and `overrides:` with dotted keys, as sweep files do.

tests/golden/resolved/ holds `cliplab config validate` of every shipped experiment file recorded before the
demo-scale variants were rewritten on their bases: the resolved configs must not change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cliplab.config import dump_yaml, load_experiment, read_tree
from cliplab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = sorted((ROOT / "tests" / "golden" / "resolved").glob("*.yaml"))


def write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("golden", GOLDEN, ids=lambda p: p.name)
def test_shipped_configs_resolve_as_before(golden: Path) -> None:
    assert dump_yaml(load_experiment(ROOT / "configs" / golden.name)) == golden.read_text()


def test_variants_are_written_on_their_bases() -> None:
    for name, base in [
        ("mcd_demo.yaml", "demo.yaml"),
        ("clip_vit_demo.yaml", "demo.yaml"),
        ("holistic_cls_demo.yaml", "clip_vit_demo.yaml"),
        ("holistic_mlp_demo.yaml", "holistic_cls_demo.yaml"),
    ]:
        assert yaml.safe_load((ROOT / "configs" / name).read_text())["base"] == base


def test_overrides_set_dotted_fields_on_the_base_chain(tmp_path: Path) -> None:
    write(
        tmp_path / "root.yaml",
        {"name": "r", "data": {"train_shards": "x/{0..1}.tar", "batch_size": 8}, "model": {"name": "ViT-B-32"},
         "train": {"steps": 10}},
    )  # fmt: skip
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.yaml", {"base": "../root.yaml", "overrides": {"train.steps": 20, "name": "m"}})
    write(tmp_path / "sub" / "leaf.yaml", {"base": "mid.yaml", "overrides": {"data.views": {"count": 2}}})
    exp = load_experiment(tmp_path / "sub" / "leaf.yaml", ["optim.lr=0.01"])
    assert (exp.name, exp.train.steps, exp.data.batch_size, exp.data.views.count, exp.optim.lr) == (
        "m",
        20,
        8,
        2,
        0.01,
    )


def test_cycles_and_stray_keys_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml", "overrides": {"name": "b"}})
    with pytest.raises(ConfigError, match=r"base: cycle of experiment files a\.yaml -> b\.yaml -> a\.yaml"):
        read_tree(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", {"base": "c.yaml"})
    with pytest.raises(ConfigError, match=r"c\.yaml: base: cycle of experiment files c\.yaml -> c\.yaml"):
        read_tree(tmp_path / "c.yaml")
    write(tmp_path / "d.yaml", {"base": "a.yaml", "train": {"steps": 3}})
    with pytest.raises(ConfigError, match=r"d\.yaml: train: a file with base: holds only base and overrides"):
        read_tree(tmp_path / "d.yaml")
    write(tmp_path / "e.yaml", {"base": "missing.yaml"})
    with pytest.raises(ConfigError, match=r"missing\.yaml: no such config file"):
        read_tree(tmp_path / "e.yaml")
    write(tmp_path / "g.yaml", {"name": "g", "train": {"steps": 1}})
    write(tmp_path / "f.yaml", {"base": "g.yaml", "overrides": {"name.x": 1}})
    with pytest.raises(ConfigError, match=r"f\.yaml: overrides\.name\.x: name is not a section"):
        read_tree(tmp_path / "f.yaml")
