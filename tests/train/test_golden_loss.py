"""Golden loss curves: a short deterministic CLIP and MCD run must reproduce the committed losses.

Single process, the real DeepSpeed engine (fp32, ZeRO-2, gloo), the real training reader over local
SynthScenes shards, fixed seeds and one intra-op thread. Any change to a loss, the model, the optimiser
step, the augmentation or the data order moves these numbers beyond the tolerance; a deliberate change
re-records them with CLIPLAB_RECORD_GOLDEN=1 (and says why in the commit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cliplab.config import validate_tree
from cliplab.data.pipeline import make_train_loader
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.data.tokenize import build_tokenizer
from cliplab.models.factory import build_model
from cliplab.objectives import build_objective
from cliplab.train.engine import build_engine, clamp_logit_scale, contrastive_step
from tiny_models import tiny_model

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "loss_curves.json"
STEPS = 6
TINY = tiny_model()
OBJECTIVES = {
    "clip": ({"name": "clip"}, {}),
    "mcd": ({"name": "mcd"}, {"views": {"count": 2, "crop_scale": [0.3, 1.0]}}),
}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    write_synthscenes(str(root / "synth"), SynthSpec(num_samples=64, samples_per_shard=32, image_size=16, seed=3))
    return root


@pytest.fixture
def shards(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A relative URL: the reader seeds each sample's augmentation from its shard URL, which must not vary."""
    monkeypatch.chdir(shard_dir)
    return "synth/{00000..00001}.tar"


def curve(shards: str, objective: dict, data: dict) -> dict[str, list[float]]:
    """Losses and logged terms of STEPS optimizer steps from a fixed seed."""
    exp = validate_tree(
        {
            "name": "golden",
            "data": {"train_shards": shards, "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16,
                     "image_size": 16, "seed": 5, **data},
            "model": {"config": TINY},
            "objective": objective,
            "optim": {"lr": 2e-3, "warmup_steps": 2},
            "deepspeed": {"zero_stage": 2, "precision": "fp32"},
            "train": {"steps": STEPS, "seed": 0},
            "scaling": {"num_workers": 1},
        }
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(exp.train.seed)
        model, pre = build_model(exp.model)
        engine = build_engine(model, exp, world_size=1)
        obj = build_objective(exp.objective.name, exp.objective.params)
        loader, _ = make_train_loader(exp.data, build_tokenizer(exp.model), pre.mean, pre.std, 0, 1, None)
        batches = iter(loader)
        out: dict[str, list[float]] = {}
        for _ in range(STEPS):
            loss, terms = contrastive_step(engine, obj, [next(batches)])
            clamp_logit_scale(engine, exp.model.max_logit_scale)
            for name, value in {"loss": loss, **terms}.items():
                out.setdefault(name, []).append(float(value))
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_curve_matches_the_golden_one(process_group, shards: str, name: str) -> None:
    got = curve(shards, *OBJECTIVES[name])
    if os.environ.get("CLIPLAB_RECORD_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.write_text(json.dumps({**golden, name: got}, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())[name]
    assert sorted(got) == sorted(want)
    for term, values in want.items():
        assert got[term] == pytest.approx(values, rel=2e-4, abs=1e-5), term
    assert got["loss"][-1] < got["loss"][0]
