"""MCD terms on hand-built tensors with known answers (mcd.md eqs. (2)-(4))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cliplab.objectives.mcd import (
    McdObjective,
    McdParams,
    distill_loss,
    log_ratio_loss,
    misalignment,
    soft_infonce_loss,
)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_misalignment_from_boxes() -> None:
    anchor = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    views = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    m = misalignment(views, anchor)
    torch.testing.assert_close(m, torch.tensor([[0.0, 0.5, 0.75, 0.75]]))
    # a view larger than a small anchor keeps all the anchor's content: crop-content 0, IoU-based > 0
    small = torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    assert misalignment(views[:, :1], small).item() == 0
    assert misalignment(views[:, :1], small, scale="iou").item() == pytest.approx(0.75)
    jitter = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(
        misalignment(views, anchor, jitter=jitter, colour_weight=0.2), torch.tensor([[0.0, 0.7, 0.95, 0.95]])
    )


def test_more_content_removed_means_larger_target_distance() -> None:
    """The log-ratio term is minimised by distances proportional to (m + eps): its optimum orders by m."""
    text = unit(1, 8)
    m = torch.tensor([[0.2, 0.6]])
    eps = 0.05
    target = torch.tensor([0.0, 0.2, 0.6]) + eps  # anchor, view 1, view 2

    def embedding_at(dist: float) -> torch.Tensor:  # a unit vector at squared distance `dist` from text
        other = F.normalize(unit(1, 8, seed=3) - (unit(1, 8, seed=3) @ text.T) * text, dim=-1)
        cos = 1 - dist / 2
        return cos * text + (1 - cos**2) ** 0.5 * other

    d = 0.1 * target / target[0]
    optimal = log_ratio_loss(embedding_at(d[0]), torch.stack([embedding_at(d[1]), embedding_at(d[2])], 1), text, m, eps)
    assert optimal.item() == pytest.approx(0.0, abs=1e-6)
    swapped = log_ratio_loss(embedding_at(d[0]), torch.stack([embedding_at(d[2]), embedding_at(d[1])], 1), text, m, eps)
    assert swapped.item() > 0.1


def test_zero_misalignment_gives_the_clip_positive_target() -> None:
    views, text = unit(4, 1, 8), unit(4, 8, seed=1)
    scale = torch.tensor([5.0])
    soft = soft_infonce_loss(views, text, torch.zeros(4, 1), scale)
    hard = F.cross_entropy(scale * views[:, 0] @ text.T, torch.arange(4))
    assert soft.item() == pytest.approx(hard.item(), rel=1e-5)
    fully = soft_infonce_loss(views, text, torch.ones(4, 1), scale)
    uniform = -F.log_softmax(scale * views[:, 0] @ text.T, dim=-1).mean(-1).mean()
    assert fully.item() == pytest.approx(uniform.item(), rel=1e-5)


def test_distillation_is_zero_for_equal_student_and_spares_the_teacher() -> None:
    anchor = unit(3, 8).requires_grad_()
    text = unit(5, 8, seed=2).requires_grad_()
    scale = torch.tensor([4.0], requires_grad=True)
    same = distill_loss(anchor, anchor[:, None, :].expand(3, 2, 8), text, scale)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    views = unit(3, 2, 8, seed=4).requires_grad_()
    loss = distill_loss(anchor, views, text, scale)
    assert loss.item() > 0
    loss.backward()
    assert anchor.grad is None, "the clean-view teacher must receive no gradient"
    assert views.grad is not None and views.grad.abs().sum() > 0
    assert text.grad is not None  # the caption bank is trained through the student side


def test_objective_logs_every_term_and_refuses_missing_views() -> None:
    params = McdParams()
    objective = McdObjective(params)
    b, v = 4, 2
    feats = {"image": unit(b, 8), "text": unit(b, 8, seed=1), "views": unit(b, v, 8, seed=2)}
    batch = {
        "crop_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * b),
        "view_boxes": torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]] * b),
    }
    total, terms = objective.loss(feats, torch.tensor([3.0]), batch)
    assert set(terms) == {"loss_clip", "loss_contrast", "loss_distill", "misalignment_mean"}
    expected = terms["loss_clip"] + terms["loss_contrast"] + terms["loss_distill"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["misalignment_mean"].item() == pytest.approx(0.375)
    with pytest.raises(ValueError, match=r"data\.views\.count"):
        objective.embed(torch.nn.Identity(), {"image": None, "text": None})


def test_ema_teacher_follows_the_student_slowly(process_group) -> None:
    """`distill_teacher: ema` on a real DeepSpeed engine: teacher = decay-weighted average of the weights."""
    from deepspeed.utils import safe_get_full_fp32_param

    from cliplab.config import validate_tree
    from cliplab.models.factory import build_model
    from cliplab.objectives import build_objective
    from cliplab.train.engine import build_engine, contrastive_step
    from cliplab.train.throughput import training_flops_per_sample

    tiny = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    exp = validate_tree(
        {
            "name": "ema",
            "data": {"train_shards": "x/{0..1}.tar", "batch_size": 4, "views": {"count": 2}},
            "model": {"config": tiny},
            "objective": {"name": "mcd", "distill_teacher": "ema", "ema_decay": 0.5},
            "optim": {"lr": 0.05, "warmup_steps": 0},
            "deepspeed": {"zero_stage": 2, "precision": "fp32"},
            "train": {"steps": 5},
            "scaling": {"num_workers": 1},
        }
    )
    model, _ = build_model(exp.model)
    engine = build_engine(model, exp, world_size=1)
    objective = build_objective("mcd", exp.objective.params)
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(4, 3, 16, 16, generator=g),
        "text": torch.randint(1, 400, (4, 8), generator=g),
        "views": torch.randn(4, 2, 3, 16, 16, generator=g),
        "crop_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4),
        "view_boxes": torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 1.0, 1.0]]] * 4),
    }
    weight = engine.module.visual.conv1.weight

    def full(p: torch.nn.Parameter) -> torch.Tensor:  # one worker runs ZeRO-0: the module holds the fp32 weights
        value = safe_get_full_fp32_param(p)
        return (value if value is not None else p.detach().float()).clone()

    w0 = full(weight)
    assert training_flops_per_sample(engine.module, objective, batch) > 0  # the loop counts FLOPs first
    contrastive_step(engine, objective, [batch])
    w1 = full(weight)
    assert not torch.equal(w0, w1)
    torch.testing.assert_close(objective.teacher.state["conv1.weight"], 0.5 * w0 + 0.5 * w1)
    feats, _ = objective.embed(engine, batch)
    assert not torch.allclose(feats["teacher"], F.normalize(feats["image"].float(), dim=-1), atol=1e-4)


def test_ema_teacher_is_refused_at_zero3() -> None:
    from cliplab.config import validate_tree
    from cliplab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"distill_teacher: ema needs deepspeed\.zero_stage"):
        validate_tree(
            {
                "name": "x",
                "data": {"train_shards": "x/{0..1}.tar", "views": {"count": 2}},
                "model": {"name": "ViT-B-32"},
                "objective": {"name": "mcd", "distill_teacher": "ema"},
                "deepspeed": {"zero_stage": 3},
                "train": {"steps": 1},
            }
        )
