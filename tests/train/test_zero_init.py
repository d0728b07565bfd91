"""ZeRO-3 construction under `deepspeed.zero.Init`: the eager build's weights, pretrained loading, branches."""

from __future__ import annotations

import open_clip
import pytest
import torch

from cliplab.config import validate_tree
from cliplab.models.factory import build_model
from cliplab.models.zero3 import is_partitioned
from cliplab.objectives.clip import ClipObjective
from cliplab.train.engine import build_engine, contrastive_step, full_state_dict, param_groups, partition_config
from tiny_models import tiny_model

TINY = tiny_model(context=8)
RESNET = {**TINY, "vision_cfg": {"image_size": 16, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}}


def experiment(model: dict, **sections) -> object:
    return validate_tree(
        {
            "name": "z3",
            "data": {"train_shards": "x/{0..1}.tar", "batch_size": 4},
            "model": model,
            "deepspeed": {"zero_stage": 3, "precision": "fp32"},
            "train": {"steps": 4},
            "scaling": {"num_workers": 1},
            **sections,
        }
    )


def partitioned(exp) -> torch.nn.Module:
    """The model built under zero.Init, on this 1-process group."""
    torch.manual_seed(0)
    model, _ = build_model(exp.model, partition_config(exp, world_size=1))
    return model


def eager(exp) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(exp.model)[0]


def full_weights(model: torch.nn.Module, exp) -> dict[str, torch.Tensor]:
    """Every parameter and buffer in full, read through the DeepSpeed engine (fp32 master copies)."""
    return full_state_dict(build_engine(model, exp, world_size=1))


@pytest.mark.parametrize("config", [TINY, RESNET], ids=["vit", "resnet"])
def test_partitioned_build_has_the_eager_initial_weights(process_group, config) -> None:
    exp = experiment({"config": config})
    model = partitioned(exp)
    assert all(is_partitioned(p) for p in model.parameters())  # no rank holds a full parameter
    got, want = full_weights(model, exp), eager(exp).state_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():  # open_clip re-initialises its children's weights after building them
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_pretrained_checkpoint_loads_under_zero3(process_group, tmp_path) -> None:
    exp = experiment({"config": TINY})
    source = eager(exp)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))  # unlike any fresh init
    state = {k: v for k, v in source.state_dict().items()}
    state["logit_scale"] = state["logit_scale"].reshape([])  # open_clip's own checkpoints hold a 0-dim scale
    path = tmp_path / "ck.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    exp = experiment({"config": TINY, "pretrained": str(path)})
    got = full_weights(partitioned(exp), exp)
    for name, value in source.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("design", ["mlp", "cls"])
def test_branches_start_from_the_pretrained_shared_weights_under_zero3(process_group, tmp_path, design) -> None:
    plain = eager(experiment({"config": TINY}))
    path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), path)
    branches = {"design": design, "count": 3, "mlp_blocks": 1}
    exp = experiment({"config": TINY, "pretrained": str(path), "branches": branches})
    got = full_weights(partitioned(exp), exp)
    torch.testing.assert_close(got["visual.proj"], plain.visual.proj)
    if design == "mlp":
        c_proj = plain.visual.transformer.resblocks[0].mlp.c_proj
        for m in range(2):
            torch.testing.assert_close(got[f"visual.branch_proj.0.{m}.weight"], c_proj.weight)
            torch.testing.assert_close(got[f"visual.branch_proj.0.{m}.bias"], c_proj.bias)
    else:
        torch.testing.assert_close(got["visual.extra_class_embedding"], plain.visual.class_embedding.expand(2, -1))
        torch.testing.assert_close(
            got["visual.extra_positional_embedding"], plain.visual.positional_embedding[:1].expand(2, -1)
        )


def test_a_checkpoint_that_does_not_fit_is_refused_under_zero3(process_group, tmp_path) -> None:
    other = open_clip.model.CLIP(**{**TINY, "embed_dim": 8}, nonscalar_logit_scale=True)
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(Exception, match="does not fit"):
        partitioned(experiment({"config": TINY, "pretrained": str(path)}))


def test_partitioned_model_keeps_the_weight_decay_split_and_trains(process_group) -> None:
    exp = experiment({"config": TINY})
    stage2 = exp.model_copy(update={"deepspeed": exp.deepspeed.model_copy(update={"zero_stage": 2})})
    assert partition_config(stage2, world_size=1) is None
    model = partitioned(exp)
    sizes = [[p.ds_numel for p in g["params"]] for g in param_groups(model, 0.1)]
    assert sizes == [[p.numel() for p in g["params"]] for g in param_groups(eager(exp), 0.1)]
    engine = build_engine(model, exp, world_size=1)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 3, 16, 16, generator=g), "text": torch.randint(1, 400, (4, 8), generator=g)}
    losses = [contrastive_step(engine, ClipObjective(), [batch])[0].item() for _ in range(3)]
    assert losses[-1] < losses[0]
