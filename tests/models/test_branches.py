"""Multi-branch image towers: shapes, distinct branches, the CLS-CLS mask, plain-checkpoint loading, export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cliplab.config import ModelConfig, validate_tree
from cliplab.errors import ConfigError
from cliplab.models.factory import build_model, load_exported
from cliplab.train.checkpoint import export_open_clip

VIT = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
M = 3


def _model(design: str, layers: int = 3, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {**VIT, "vision_cfg": {**VIT["vision_cfg"], "layers": layers}}
    model, _ = build_model(ModelConfig(config=config, branches={"design": design, "count": M, **extra}, **{}))
    return model.eval()


def _images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("design", ["cls", "mlp"])
def test_each_design_emits_m_distinct_unit_embeddings(design: str) -> None:
    model = _model(design, mlp_blocks=2)
    with torch.no_grad():
        feats = model.encode_image(_images(), normalize=True)
    assert feats.shape == (4, M, 24)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(4, M))
    for a in range(M):
        for b in range(a + 1, M):
            assert (feats[:, a] - feats[:, b]).abs().max() > 1e-3, f"branches {a} and {b} coincide"
    out = model(image=_images(), text=torch.randint(0, 400, (4, 16)))
    assert out["image_features"].shape == (4, M, 24) and out["text_features"].shape == (4, 24)


def test_class_tokens_do_not_see_each_other() -> None:
    """One block: class token a reads only itself and the patches, so moving token 2 changes only branch 2."""
    model = _model("cls", layers=1)
    with torch.no_grad():
        before = model.encode_image(_images())
        model.visual.extra_class_embedding[1] += torch.randn(32)  # (a constant shift would vanish in ln_pre)
        after = model.encode_image(_images())
    torch.testing.assert_close(after[:, :2], before[:, :2])
    assert (after[:, 2] - before[:, 2]).abs().max() > 1e-3
    mask = model.visual.cls_mask(M + 2, torch.float32, torch.device("cpu"))
    assert torch.isinf(mask[:M, :M]).sum() == M * (M - 1) and (mask[M:] == 0).all() and (mask[:, M:] == 0).all()


def test_mlp_branches_share_everything_before_their_projection() -> None:
    """One modified block: branch 1's c_proj moves branch 1 only; the shared c_fc moves all branches."""
    model = _model("mlp", mlp_blocks=1)
    block = model.visual.transformer.resblocks[-1]
    with torch.no_grad():
        before = model.encode_image(_images())
        model.visual.branch_proj[0][0].bias += torch.randn(32)  # (a constant shift would vanish in ln_post)
        after = model.encode_image(_images())
        torch.testing.assert_close(after[:, [0, 2]], before[:, [0, 2]])
        assert (after[:, 1] - before[:, 1]).abs().max() > 1e-3
        block.mlp.c_fc.bias += torch.randn(128)
        shared = model.encode_image(_images())
    assert all((shared[:, m] - after[:, m]).abs().max() > 1e-3 for m in range(M))


@pytest.mark.parametrize("design", ["cls", "mlp"])
def test_plain_open_clip_checkpoint_loads_into_shared_parts(tmp_path: Path, design: str) -> None:
    torch.manual_seed(3)
    plain, _ = build_model(ModelConfig(config=VIT))
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": plain.state_dict()}, path)
    branched, _ = build_model(ModelConfig(config=VIT, pretrained=str(path), branches={"design": design, "count": M}))
    shared = {k: v for k, v in branched.state_dict().items() if k in plain.state_dict()}
    assert set(shared) == set(plain.state_dict())
    for key, value in shared.items():
        torch.testing.assert_close(value, plain.state_dict()[key], msg=key)
    with torch.no_grad():  # every branch starts from the pretrained embedding
        want = plain.eval().encode_image(_images(), normalize=True)
        got = branched.eval().encode_image(_images(), normalize=True)
    for m in range(1, M):
        torch.testing.assert_close(got[:, m], got[:, 0], rtol=1e-4, atol=1e-5)
    if design == "mlp":  # identical c_proj copies: exactly the plain model
        torch.testing.assert_close(got[:, 0], want, rtol=1e-4, atol=1e-5)
    else:  # patches now attend to M copies of the class token, so deeper blocks differ slightly
        assert (got[:, 0] * want).sum(-1).min() > 0.98


@pytest.mark.parametrize("design", ["cls", "mlp"])
def test_export_loads_back_with_its_architecture(tmp_path: Path, design: str) -> None:
    exp = validate_tree(
        {
            "name": "x",
            "data": {"train_shards": "s3://b/0.tar"},
            "train": {"steps": 1},
            "model": {"config": VIT, "branches": {"design": design, "count": M}},
        }
    )
    model, _ = build_model(exp.model)
    export_open_clip(model.state_dict(), exp, tmp_path)
    loaded, pre, cfg = load_exported(str(tmp_path))
    assert cfg.branches is not None and cfg.branches.design == design and pre.image_size == 32
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode_image(_images()), model.eval().encode_image(_images()))


def test_branches_need_a_vit_tower() -> None:
    resnet = {**VIT, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}}
    with pytest.raises(ConfigError, match="needs a ViT vision tower"):
        build_model(ModelConfig(config=resnet, branches={"design": "cls", "count": 2}))
    with pytest.raises(ConfigError, match="mlp_blocks 5 > the vision tower's 3 blocks"):
        build_model(ModelConfig(config=VIT, branches={"design": "mlp", "count": 2, "mlp_blocks": 5}))
