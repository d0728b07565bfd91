"""DeepSpeed engine assembly on a real single-process gloo group: temperature clamp, schedule, export."""

from __future__ import annotations

import math

import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from cliplab.config import validate_tree
from cliplab.models.factory import build_model
from cliplab.objectives.clip import ClipObjective
from cliplab.train.engine import build_engine, clamp_logit_scale, contrastive_step, full_state_dict, lr_lambda
from tiny_models import tiny_model

TINY = tiny_model(context=8)


def exp_with(zero: int = 2, **train):
    return validate_tree(
        {
            "name": "eng",
            "data": {"train_shards": "x/{0..1}.tar", "batch_size": 4},
            "model": {"config": TINY},
            "optim": {"lr": 0.1, "warmup_steps": 2, "min_lr_ratio": 0.1},
            "deepspeed": {"zero_stage": zero, "precision": "fp32"},
            "train": {"steps": 10, **train},
            "scaling": {"num_workers": 1},
        }
    )


def batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n, 3, 16, 16, generator=g), "text": torch.randint(1, 400, (n, 8), generator=g)}


@pytest.mark.parametrize("zero", [0, 3])  # ZeRO-0: the module parameter is the master; ZeRO-3: a partition
def test_clamp_bounds_the_temperature_in_the_master_weights(process_group, zero) -> None:
    exp = exp_with(zero)
    model, _ = build_model(exp.model)
    engine = build_engine(model, exp, world_size=1)
    scale = engine.module.logit_scale
    if zero:
        safe_set_full_fp32_param(scale, torch.tensor([9.0]))
    else:
        scale.data.fill_(9.0)
    assert clamp_logit_scale(engine, 100.0) == pytest.approx(100.0, rel=1e-5)
    contrastive_step(engine, ClipObjective(), [batch()])
    # the step copies the fp32 master back into the module: the clamp survived it
    master = safe_get_full_fp32_param(scale) if zero else scale.detach()
    assert master.item() <= math.log(100.0) + 1e-3


def test_warmup_then_cosine_to_the_floor() -> None:
    f = lr_lambda(exp_with())
    assert [round(f(s), 3) for s in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(9) < f(5) < f(2)
    assert f(10) == pytest.approx(0.1)


def test_accumulated_step_trains_and_full_state_loads_into_open_clip(process_group) -> None:
    exp = exp_with(accum_steps=2)
    model, _ = build_model(exp.model)
    engine = build_engine(model, exp, world_size=1)
    b = batch(8)
    micro = [{k: v[:4] for k, v in b.items()}, {k: v[4:] for k, v in b.items()}]
    losses = [contrastive_step(engine, ClipObjective(), micro)[0].item() for _ in range(5)]
    assert losses[-1] < losses[0]
    state = full_state_dict(engine)
    fresh, _ = build_model(exp.model)
    fresh.load_state_dict(state)
    # one worker runs ZeRO-0 in fp32: the module's parameters are the master weights
    torch.testing.assert_close(fresh.visual.conv1.weight, engine.module.visual.conv1.weight)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_one_worker_runs_no_gradient_all_reduce(process_group, monkeypatch, stage) -> None:
    import deepspeed.comm

    exp = exp_with(stage)
    engine = build_engine(build_model(exp.model)[0], exp, world_size=1)
    reduced: list[int] = []
    real = deepspeed.comm.all_reduce
    monkeypatch.setattr(deepspeed.comm, "all_reduce", lambda t, *a, **k: reduced.append(t.numel()) or real(t, *a, **k))
    contrastive_step(engine, ClipObjective(), [batch()])
    assert engine.zero_optimization_stage() == 0 and not engine.enable_backward_allreduce
    assert reduced and max(reduced) == 1  # only the gradient norm for clipping, no gradient bucket
