"""The experiment schema refuses bad input naming file and field, applies overrides, keeps secrets out."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cliplab.config import dump_yaml, load_experiment
from cliplab.errors import ConfigError
from tiny_models import tiny_model

CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if not p.name.startswith("sweep_")
)  # sweep files: tests/sweep


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def base() -> dict:
    return {
        "name": "t",
        "data": {"train_shards": "s3://b/{00000..00003}.tar"},
        "model": {"name": "ViT-B-32"},
        "train": {"steps": 10},
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    exp = load_experiment(path)
    assert exp.train.steps > 0


def test_unknown_key_is_refused_with_file_and_dotted_field(tmp_path: Path) -> None:
    tree = base()
    tree["optim"] = {"learning_rate": 1e-3}
    path = write(tmp_path, tree)
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert str(path) in str(err.value)
    assert "optim.learning_rate: unknown key" in str(err.value)


def test_bad_values_name_every_field(tmp_path: Path) -> None:
    tree = base()
    tree["data"]["batch_size"] = 0
    tree["deepspeed"] = {"zero_stage": 4}
    with pytest.raises(ConfigError) as err:
        load_experiment(write(tmp_path, tree))
    assert "data.batch_size" in str(err.value) and "deepspeed.zero_stage" in str(err.value)


def test_overrides_apply_and_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, base())
    exp = load_experiment(path, ["optim.lr=1e-4", "deepspeed.zero_stage=3", "data.crop_scale=[0.5, 0.9]"])
    assert exp.optim.lr == pytest.approx(1e-4)
    assert exp.deepspeed.zero_stage == 3
    assert exp.data.crop_scale == (0.5, 0.9)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_experiment(path, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        load_experiment(path, ["optim.lr"])


def test_secrets_never_come_from_yaml(tmp_path: Path) -> None:
    tree = base()
    tree["storage"] = {"path": "s3://b/runs", "aws_secret_access_key": "x"}
    with pytest.raises(ConfigError, match=r"storage\.aws_secret_access_key: secrets are never read"):
        load_experiment(write(tmp_path, tree))


def test_objective_params_are_validated_by_the_objective(tmp_path: Path) -> None:
    tree = base()
    tree["objective"] = {"name": "clip", "temperature": 0.1}
    with pytest.raises(ConfigError, match=r"objective\.temperature"):
        load_experiment(write(tmp_path, tree))
    tree["objective"] = {"name": "nope"}
    with pytest.raises(ConfigError, match="unknown objective 'nope'"):
        load_experiment(write(tmp_path, tree))


def test_cross_field_rules(tmp_path: Path) -> None:
    tree = base()
    tree["deepspeed"] = {"precision": "fp16"}
    with pytest.raises(ConfigError, match=r"fp16 needs scaling\.use_gpu"):
        load_experiment(write(tmp_path, tree))
    tree = base()
    tree["data"]["resampled"] = True
    with pytest.raises(ConfigError, match="samples_per_epoch"):
        load_experiment(write(tmp_path, tree))
    tree = base()
    tree["model"] = {"name": "ViT-B-32", "config": {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}}
    with pytest.raises(ConfigError, match=r"exactly one of model\.name or model\.config"):
        load_experiment(write(tmp_path, tree))


def test_resolved_yaml_round_trips(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, base()), ["train.steps=7"])
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_yaml(exp))
    assert load_experiment(again) == exp


def test_zeroshot_classnames_may_be_numbers(tmp_path: Path) -> None:
    tree = base()
    tree["data"]["val_shards"] = "s3://b/val.tar"
    tree["eval"] = {"zeroshot": [{"name": "digits", "label_field": "label", "classnames": [0, 1, 2.5]}]}
    exp = load_experiment(write(tmp_path, tree))
    assert exp.eval.zeroshot[0].classnames == ["0", "1", "2.5"]


def test_a_missing_config_and_a_directory_get_different_messages(tmp_path: Path) -> None:
    write(tmp_path, base())
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such config file"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(
        ConfigError, match=r"is a directory, not a config file; give the YAML file itself; it holds exp"
    ):
        load_experiment(tmp_path)


TINY = tiny_model(embed=32, image=32, width=64, text_width=32)


def test_inline_model_config_is_checked_against_open_clip_before_any_worker() -> None:
    from cliplab.config import ModelConfig
    from cliplab.models.factory import check_model

    check_model(ModelConfig(config=TINY))
    check_model(ModelConfig(name="ViT-B-32"))
    wrong = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "width": "64", "layers": 1.5, "patchsize": 8}}
    with pytest.raises(ConfigError) as err:
        check_model(ModelConfig(config={**wrong, "embed_dim": "32"}))
    for line in (
        "model.config.embed_dim: expected int, got '32'",
        "model.config.vision_cfg.width: expected int, got '64'",
        "model.config.vision_cfg.layers: expected Union[Tuple[int, int, int, int], int], got 1.5",
        "model.config.vision_cfg.patchsize: unknown key",
    ):
        assert line in str(err.value)
    odd = {**TINY, "text_cfg": {**TINY["text_cfg"], "width": 33}}  # types fine, not divisible by heads
    with pytest.raises(ConfigError, match=r"model\.config: open_clip cannot build this model"):
        check_model(ModelConfig(config=odd))
