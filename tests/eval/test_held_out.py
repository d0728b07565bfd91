"""Held-out evaluation on W gloo ranks covers the held-out set exactly once, whatever the shard count."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cliplab.config import ModelConfig
from cliplab.data.pipeline import eval_batches, read_shard
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.data.tokenize import build_tokenizer
from cliplab.eval.embed import embed_batches
from cliplab.eval.probes import misalignment_probe
from cliplab.eval.runner import evaluate

NORM = ((0.5,) * 3, (0.5,) * 3)
SAMPLES = 37


class Encoders(torch.nn.Module):
    """Features straight from the pixels and tokens: enough to embed and gather."""

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(x.flatten(1)[:, :8].float(), dim=-1)

    def encode_text(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(x[:, :8].float(), dim=-1)


def tokenizer():
    return build_tokenizer(ModelConfig(config={"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"context_length": 16}}))


def _worker(rank: int, world: int, port: int, spec: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tok, cpu = tokenizer(), torch.device("cpu")
    got = {}
    for cap in (SAMPLES, 1000, 17):
        batches = eval_batches(spec, 8, 32, *NORM, tok, "txt", rank, world, cap)
        got[cap] = embed_batches(Encoders(), batches, cpu)["key"]
    metrics = evaluate(Encoders(), tok, eval_batches(spec, 8, 32, *NORM, tok, "txt", rank, world, SAMPLES), [], cpu)
    probe = misalignment_probe(Encoders(), tok, spec, 32, *NORM, "txt", rank, world, 11, cpu)
    out[rank] = (got, metrics["eval/n_samples"], probe["probe/n_crops"])
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_val_shard(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("val")
    write_synthscenes(str(root), SynthSpec(num_samples=SAMPLES, samples_per_shard=SAMPLES, image_size=32, seed=3))
    return f"{root}/00000.tar"


def test_one_shard_on_two_ranks_is_evaluated_once_and_exactly_capped(one_val_shard: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, port, one_val_shard, out), nprocs=2, join=True)
    in_order = [raw["__key__"] for raw in read_shard(one_val_shard, [])]
    assert len(in_order) == SAMPLES and Path(one_val_shard).exists()
    for rank in (0, 1):
        keys, n_samples, n_crops = out[rank]
        assert keys[SAMPLES] == keys[1000] == sorted(in_order), "every held-out sample exactly once"
        assert keys[17] == sorted(in_order[:17]), "max_samples: the first 17 in shard order"
        assert n_samples == SAMPLES
        assert n_crops == 11 * 6, "the probe crops exactly probe_images images"
