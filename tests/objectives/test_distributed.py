"""Objective losses and gradients on W Ray workers equal the single-process loss on the global batch.

Runs a real 2-worker TorchTrainer (gloo) for CLIP and MCD. Also checks contrastive accumulation through a
real DeepSpeed engine: 2 micro-batches per worker give the same update as the whole global batch at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
import torch.nn.functional as F

from cliplab.objectives import build_objective
from cliplab.objectives.clip import ClipObjective

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N, D_IN, D, V = 8, 6, 4, 2


class Towers(torch.nn.Module):
    """Two linear towers and a [1]-shaped temperature, open_clip's output dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(D_IN, D)
        self.txt = torch.nn.Linear(D_IN, D)
        self.logit_scale = torch.nn.Parameter(torch.tensor([2.0]))

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict:
        return {
            "image_features": F.normalize(self.img(image), dim=-1) if image is not None else None,
            "text_features": F.normalize(self.txt(text), dim=-1) if text is not None else None,
            "logit_scale": self.logit_scale.exp(),
        }


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lo = torch.rand(N, V, 2, generator=g) * 0.5
    return {
        "image": torch.randn(N, D_IN, generator=g),
        "text": torch.randn(N, D_IN, generator=g),
        "views": torch.randn(N, V, D_IN, generator=g),
        "crop_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * N),
        "view_boxes": torch.cat([lo, lo + 0.5], dim=-1),
    }


def reference_grads(objective: str = "clip") -> tuple[float, dict[str, torch.Tensor]]:
    model = Towers()
    obj = build_objective(objective, {})
    batch = global_batch()
    feats, scale = obj.embed(model, batch)
    loss, _ = obj.loss(feats, scale, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _local(rank: int, world: int) -> dict[str, torch.Tensor]:
    b = N // world
    return {k: v[rank * b : (rank + 1) * b] for k, v in global_batch().items()}


def loss_worker(cfg: dict) -> None:
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = Towers()
    objective = build_objective(cfg["objective"], {})
    batch = _local(rank, world)
    feats, scale = objective.embed(model, batch)
    loss, _ = objective.loss(feats, scale, batch)
    loss.backward()
    for p in model.parameters():  # data-parallel average, as DDP/DeepSpeed do
        dist.all_reduce(p.grad)
        p.grad /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.save(
        {"loss": mean_loss.item() / world, "grads": {n: p.grad for n, p in model.named_parameters()}},
        Path(cfg["out"]) / f"rank{rank}.pt",
    )
    ray.train.report({"done": 1})


def accumulation_worker(cfg: dict) -> None:
    import deepspeed
    import ray.train

    from cliplab.train.engine import contrastive_step

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = Towers()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    accum = cfg["accum"]
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        config={
            "train_micro_batch_size_per_gpu": N // world // accum,
            "gradient_accumulation_steps": accum,
            "train_batch_size": N,
            "zero_optimization": {"stage": cfg["zero"]},
            "steps_per_print": 10**9,
            "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True,
        },
    )
    local = _local(rank, world)
    mb = N // world // accum
    micro = [{k: v[i * mb : (i + 1) * mb] for k, v in local.items()} for i in range(accum)]
    contrastive_step(engine, ClipObjective(), micro)
    from deepspeed.utils import safe_get_full_fp32_param

    delta = {n: before[n] - safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save(delta, Path(cfg["out"]) / "delta.pt")
    ray.train.report({"done": 1})


def _fit(loop, cfg: dict, tmp_path: Path, workers: int = 2) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    TorchTrainer(
        loop,
        train_loop_config=cfg,
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name=f"t-{tmp_path.name}", storage_path=str(tmp_path / "ray")),
    ).fit()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["clip", "mcd"])
def test_loss_and_grads_match_single_process(ray_local, tmp_path: Path, objective: str) -> None:
    ref_loss, ref_grads = reference_grads(objective)
    _fit(loss_worker, {"out": str(tmp_path), "objective": objective}, tmp_path)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [1, 3])
def test_contrastive_accumulation_keeps_global_negatives(ray_local, tmp_path: Path, zero: int) -> None:
    _, ref_grads = reference_grads()
    _fit(accumulation_worker, {"out": str(tmp_path), "accum": 2, "zero": zero}, tmp_path)
    delta = torch.load(tmp_path / "delta.pt")
    for name, grad in ref_grads.items():  # SGD with lr=1: the update is the averaged gradient
        torch.testing.assert_close(delta[name].reshape(grad.shape), grad, rtol=1e-4, atol=1e-6)


def test_single_process_clip_loss_is_symmetric_infonce() -> None:
    from cliplab.objectives.clip import contrastive_loss

    img = F.normalize(torch.randn(5, 3), dim=-1)
    scale = torch.tensor([3.0])
    total, i2t, t2i = contrastive_loss(img, img, scale)
    logits = scale * img @ img.T
    assert total.item() == pytest.approx(F.cross_entropy(logits, torch.arange(5)).item(), rel=1e-6)
    assert i2t.item() == pytest.approx(t2i.item(), rel=1e-6)
