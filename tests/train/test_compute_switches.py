"""The `compute` section: compile (model, blocks) and checkpointing change no numbers; the optimizer resolves."""

from __future__ import annotations

import copy

import open_clip.transformer
import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend, register_backend

import cliplab.models.branches
from cliplab.config import ModelConfig, validate_tree
from cliplab.errors import ConfigError
from cliplab.models.compute import compile_blocks, set_grad_checkpointing
from cliplab.models.factory import build_model
from cliplab.objectives.clip import ClipObjective, contrastive_loss
from cliplab.train.engine import build_engine, build_optimizer, contrastive_step, optimizer_kind
from cliplab.train.throughput import training_flops_per_sample
from tiny_models import tiny_model

TINY = tiny_model(context=8)
TWO_LAYERS = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "layers": 2}}
BRANCHES = {
    "plain": None,
    "cls": {"design": "cls", "count": 2},
    "mlp": {"design": "mlp", "count": 2, "mlp_blocks": 1},
}


COUNTING_BACKEND = "cliplab_test_counting"
GRAPHS: list[torch.fx.GraphModule] = []


@register_backend(name=COUNTING_BACKEND)
def _counting(gm: torch.fx.GraphModule, inputs: list) -> object:
    GRAPHS.append(gm)
    return lookup_backend("aot_eager")(gm, inputs)


def experiment(compute: dict | None = None, use_gpu: bool = False, **deepspeed) -> object:
    tree = {
        "name": "compute",
        "data": {"train_shards": "x/{0..1}.tar", "batch_size": 4},
        "model": {"config": TINY},
        "deepspeed": {"zero_stage": 2, "precision": "fp32", **deepspeed},
        "train": {"steps": 4},
        "scaling": {"num_workers": 1, "use_gpu": use_gpu},
    }
    if compute is not None:
        tree["compute"] = compute
    return validate_tree(tree)


def model_with(branches: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(config=TWO_LAYERS, branches=BRANCHES[branches]))
    return model


def batch(n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n, 3, 16, 16, generator=g), "text": torch.randint(1, 400, (n, 8), generator=g)}


def loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The CLIP loss of one batch (branch embeddings averaged) and every parameter's gradient."""
    model.zero_grad()
    out = model(**batch())
    image = out["image_features"]
    loss, _, _ = contrastive_loss(image.mean(1) if image.ndim == 3 else image, out["text_features"], out["logit_scale"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-3, atol=1e-5, msg=name)


def test_compute_defaults_and_unknown_keys() -> None:
    c = experiment().compute
    assert (c.compile, c.grad_checkpointing, c.optimizer) == ("none", False, "auto")
    with pytest.raises(ConfigError, match=r"compute\.fused_adam: unknown key"):
        experiment({"fused_adam": True})
    with pytest.raises(ConfigError, match=r"compute\.compile"):
        experiment({"compile": "full"})
    with pytest.raises(ConfigError, match=r"compute\.compile blocks does not work with deepspeed\.zero_stage 3"):
        experiment({"compile": "blocks"}, zero_stage=3)
    assert experiment({"compile": "model"}, zero_stage=3).compute.compile == "model"


def test_optimizer_resolves_auto_by_device_and_refuses_fused_on_cpu() -> None:
    assert optimizer_kind(experiment()) == "torch"
    assert optimizer_kind(experiment(use_gpu=True)) == "fused"
    assert optimizer_kind(experiment({"optimizer": "torch"}, use_gpu=True)) == "torch"
    assert optimizer_kind(experiment({"optimizer": "fused"}, use_gpu=True)) == "fused"
    with pytest.raises(ConfigError, match=r"compute\.optimizer fused needs scaling\.use_gpu"):
        experiment({"optimizer": "fused"})
    opt = build_optimizer(model_with("plain"), experiment())
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]


@pytest.mark.parametrize("branches", BRANCHES)
def test_grad_checkpointing_checkpoints_every_tower_and_keeps_the_gradients(branches: str, monkeypatch) -> None:
    eager = loss_and_grads(model_with(branches))
    calls: list[str] = []
    for module in (open_clip.transformer, cliplab.models.branches):
        real = module.checkpoint

        def counted(fn, *args, _real=real, **kwargs):
            calls.append(type(getattr(fn, "__self__", fn)).__name__)
            return _real(fn, *args, **kwargs)

        monkeypatch.setattr(module, "checkpoint", counted)
    model = model_with(branches)
    set_grad_checkpointing(model, True)
    assert_same(loss_and_grads(model), eager)
    assert len(calls) == 3, calls  # both vision blocks (plain or branch) and the text block


@pytest.mark.parametrize(("mode", "branches"), [("model", "plain"), ("blocks", "plain"), ("blocks", "mlp")])
def test_compiled_model_gives_the_eager_loss_and_gradients(mode: str, branches: str) -> None:
    """Dynamo capture and AOT autograd of the real towers (aot_eager: inductor's codegen runs in the engine test)."""
    model = model_with(branches)
    eager = loss_and_grads(copy.deepcopy(model))
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, inputs)

    if mode == "model":
        model.compile(backend=backend)  # what DeepSpeed's engine.compile() does to engine.module
    else:
        assert compile_blocks(model, backend=backend) == 3  # 2 vision + 1 text ResidualAttentionBlocks
    compiled = loss_and_grads(model)
    assert len(graphs) >= {"model": 1, "blocks": 2}[mode] + (branches == "mlp")
    assert_same(compiled, eager)
    flops = training_flops_per_sample(model, ClipObjective(), batch())
    assert flops == training_flops_per_sample(copy.deepcopy(model_with(branches)), ClipObjective(), batch())


@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_deepspeed_engine_steps_with_compile_and_checkpointing(mode: str, process_group) -> None:
    """build_engine's path through DeepSpeed's hooks on `compute.compile_backend` (a counting aot_eager here:
    inductor's codegen on CPU costs minutes cold)."""
    exp = experiment({"compile": mode, "compile_backend": COUNTING_BACKEND, "grad_checkpointing": True})
    GRAPHS.clear()
    torch.manual_seed(0)
    model, _ = build_model(exp.model)
    reference = copy.deepcopy(model)
    engine = build_engine(model, exp, world_size=1)
    assert engine.is_compiled == (mode == "model") and engine.module.transformer.grad_checkpointing
    assert set(engine.module.state_dict()) == set(reference.state_dict())  # in place: no _orig_mod prefixes
    eager_engine = build_engine(reference, experiment(), world_size=1)
    for _ in range(2):
        loss, _ = contrastive_step(engine, ClipObjective(), [batch()])
        eager_loss, _ = contrastive_step(eager_engine, ClipObjective(), [batch()])
        torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, param in engine.module.named_parameters():
        torch.testing.assert_close(param, dict(eager_engine.module.named_parameters())[name], msg=name)
    assert GRAPHS, "compute.compile_backend was not the backend used"
