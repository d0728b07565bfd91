"""The M2M loss (holistic.md "Losses"): CLIP at M = 1, the equations with free matching, the diversity hinge,
and multi-worker equivalence with the single-process loss on the global batch (real 2-worker TorchTrainer)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
import torch.nn.functional as F

from cliplab.config import validate_tree
from cliplab.errors import ConfigError
from cliplab.objectives import build_objective
from cliplab.objectives.clip import contrastive_loss
from cliplab.objectives.holistic import diversity_hinge, m2m_loss

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

N, D_IN, D, M, C = 8, 6, 4, 3, 3


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_m2m_with_one_branch_and_one_slot_is_the_clip_loss() -> None:
    img, txt, scale = _unit(N, D, seed=0), _unit(N, D, seed=1), torch.tensor([5.0])
    total, i2t, t2i, per_slot = m2m_loss(img[:, None], txt[:, None], scale, torch.ones(N, 1, dtype=torch.bool))
    ref, ref_i2t, ref_t2i = contrastive_loss(img, txt, scale)
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(i2t, ref_i2t)
    torch.testing.assert_close(t2i, ref_t2i)
    torch.testing.assert_close(per_slot, ref[None])


def reference_m2m(img: torch.Tensor, txt: torch.Tensor, s: float, fixed: torch.Tensor) -> float:
    """holistic.md eqs. 1-5 written pair by pair."""
    n, branches, _ = img.shape
    total = 0.0
    for c in range(txt.shape[1]):

        def sigma(j: int, c: int = c) -> int:
            if c < branches and fixed[j, c]:
                return c
            return int(max(range(branches), key=lambda m: float(img[j, m] @ txt[j, c])))

        for j in range(n):
            row = torch.stack([s * img[j, sigma(j)] @ txt[k, c] for k in range(n)])
            total += -torch.log_softmax(row, 0)[j].item() / 2
            col = torch.stack([s * txt[j, c] @ img[i, sigma(j)] for i in range(n)])
            total += -torch.log_softmax(col, 0)[j].item() / 2
    return total / (n * txt.shape[1])


@pytest.mark.parametrize("slots", [C, C + 2])
def test_m2m_follows_the_equations_with_free_matching(slots: int) -> None:
    img, txt = _unit(N, M, D, seed=2), _unit(N, slots, D, seed=3)
    fixed = torch.rand(N, slots, generator=torch.Generator().manual_seed(4)) > 0.3  # some pairs lack a caption
    total, *_ = m2m_loss(img, txt, torch.tensor([4.0]), fixed)
    assert total.item() == pytest.approx(reference_m2m(img, txt, 4.0, fixed), rel=1e-5)
    free, *_ = m2m_loss(img, txt, torch.tensor([4.0]), torch.zeros_like(fixed))
    assert free.item() == pytest.approx(reference_m2m(img, txt, 4.0, torch.zeros_like(fixed)), rel=1e-5)
    assert free.item() != pytest.approx(total.item(), rel=1e-3)


def test_diversity_hinge() -> None:
    same = _unit(N, 1, D, seed=5).expand(N, M, D)
    assert diversity_hinge(same, 0.7).item() == pytest.approx(0.3, abs=1e-6)
    eye = torch.eye(M, D).expand(N, M, D)
    assert diversity_hinge(eye, 0.7).item() == 0.0
    assert diversity_hinge(_unit(N, 1, D, seed=6), 0.7).item() == 0.0


def test_objective_switches_and_logs_per_branch_terms() -> None:
    feats = {"image": _unit(N, M, D, seed=7), "text": _unit(N, C, D, seed=8)}
    batch = {"caption_own": torch.ones(N, C, dtype=torch.bool)}
    plain_total, terms = build_objective("holistic", {}).loss(feats, torch.tensor([3.0]), batch)
    assert {"loss_i2t", "loss_t2i", "loss_branch0", "loss_branch2", "own_caption_frac"} <= set(terms)
    assert "loss_div" not in terms
    div_total, div_terms = build_objective("holistic", {"diversity": True, "diversity_margin": -1.0}).loss(
        feats, torch.tensor([3.0]), batch
    )
    assert div_terms["loss_div"] > 0
    torch.testing.assert_close(div_total, plain_total + div_terms["loss_div"])


def _tree(**model) -> dict:
    return {
        "name": "h",
        "data": {"train_shards": "s3://b/0.tar", "captions": {"slots": ["colour", "shape"]}},
        "train": {"steps": 1},
        "objective": {"name": "holistic"},
        "model": {"config": {"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}}, **model},
    }


def test_config_refuses_holistic_without_slots_or_with_untrained_branches() -> None:
    validate_tree(_tree(branches={"design": "cls", "count": 2}))
    tree = _tree()
    del tree["data"]["captions"]
    with pytest.raises(ConfigError, match=r"objective holistic needs data\.captions"):
        validate_tree(tree)
    with pytest.raises(ConfigError, match="branches without a caption slot never train"):
        validate_tree(_tree(branches={"design": "mlp", "count": 3}))
    tree = _tree(branches={"design": "mlp", "count": 3})
    tree["objective"]["assignment"] = "free"
    validate_tree(tree)
    tree["objective"]["diversity_weigth"] = 1.0
    with pytest.raises(ConfigError, match=r"objective\.diversity_weigth: unknown key"):
        validate_tree(tree)


class BranchTowers(torch.nn.Module):
    """M linear image heads and a linear text tower with a [1]-shaped temperature, open_clip's output dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(D_IN, M * D)
        self.txt = torch.nn.Linear(D_IN, D)
        self.logit_scale = torch.nn.Parameter(torch.tensor([2.0]))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict:
        return {
            "image_features": F.normalize(self.img(image).view(-1, M, D), dim=-1),
            "text_features": F.normalize(self.txt(text), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(N, D_IN, generator=g),
        "texts": torch.randn(N, C, D_IN, generator=g),
        "caption_own": torch.rand(N, C, generator=g) > 0.25,
    }


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    objective = build_objective("holistic", {"diversity": True, "diversity_margin": 0.0})
    feats, scale = objective.embed(model, batch)
    loss, _ = objective.loss(feats, scale, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def loss_worker(cfg: dict) -> None:
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    b = N // world
    local = {k: v[rank * b : (rank + 1) * b] for k, v in global_batch().items()}
    loss, grads = _loss_and_grads(BranchTowers(), local)
    for g in grads.values():  # data-parallel average, as DeepSpeed does
        dist.all_reduce(g)
        g /= world
    dist.all_reduce(loss)
    torch.save({"loss": loss.item() / world, "grads": grads}, Path(cfg["out"]) / f"rank{rank}.pt")
    ray.train.report({"done": 1})


@pytest.mark.slow
def test_two_workers_match_the_single_process_loss_on_the_global_batch(ray_local, tmp_path: Path) -> None:
    """Without the diversity hinge (local by definition, holistic.md eq. 6) the match is exact; with it, the
    hinge of each worker's half enters the loss, so the check compares against that decomposition."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    TorchTrainer(
        loss_worker,
        train_loop_config={"out": str(tmp_path)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name=f"h-{tmp_path.name}", storage_path=str(tmp_path / "ray")),
    ).fit()
    batch = global_batch()
    model = BranchTowers()
    objective = build_objective("holistic", {})
    feats, scale = objective.embed(model, batch)
    m2m, _ = objective.loss(feats, scale, batch)
    halves = [diversity_hinge(feats["image"][i * N // 2 : (i + 1) * N // 2], 0.0) for i in range(2)]
    (m2m + sum(halves) / 2).backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"] == pytest.approx((m2m + sum(halves) / 2).item(), rel=1e-5)
        for name, param in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
