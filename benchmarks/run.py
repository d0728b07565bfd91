"""Throughput benchmarks, each printed as a ratio against a baseline measured in the same process.

1. Training: samples/s of the cliplab step (DeepSpeed engine + contrastive step + temperature clamp)
   next to a plain PyTorch loop (AdamW, forward, symmetric InfoNCE, backward, step) on the same model
   and the same batches.
2. Objectives: step time of MCD (anchor + 2 misaligned views) over the CLIP step, same backbone and batch;
   step time of holistic CLIP (5 caption slots; multi-CLS and parallel-MLP towers) over the CLIP step on
   the tiny ViT of configs/clip_vit_demo.yaml, same batches.
3. Loading: samples/s of the cliplab reader streaming shards from the S3 endpoint (embedded moto on
   127.0.0.1) next to the same shards on local disk.

    .venv/bin/python benchmarks/run.py [--steps 30] [--batch 128] [--zero 2] [--precision fp32]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from cliplab.config import read_tree, validate_tree
from cliplab.data.pipeline import make_train_loader
from cliplab.data.synth import SynthSpec, write_synthscenes
from cliplab.data.tokenize import build_tokenizer
from cliplab.embedded import create_bucket, s3_env, start_s3_server
from cliplab.models.factory import build_model
from cliplab.objectives import build_objective
from cliplab.objectives.clip import contrastive_loss
from cliplab.train.engine import build_engine, clamp_logit_scale, contrastive_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = CONFIGS / "demo.yaml"
HOLISTIC = {
    "CLIP": CONFIGS / "clip_vit_demo.yaml",
    "holistic Psi_CLS": CONFIGS / "holistic_cls_demo.yaml",
    "holistic Psi_MLP": CONFIGS / "holistic_mlp_demo.yaml",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_group() -> None:
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        DS_ACCELERATOR="cpu",
    )
    torch.distributed.init_process_group("gloo")


def _experiment(args: argparse.Namespace, shards: str, objective: str | None = "clip", config: Path = DEMO):
    """The config's experiment on these shards, one worker, the benchmark's batch and engine settings."""
    tree = read_tree(config)
    tree["data"].update(train_shards=shards, val_shards=None, batch_size=args.batch, num_workers=args.loader_workers)
    if objective is not None:
        tree["objective"] = {"name": objective}
    if objective == "mcd":
        tree["data"]["views"] = {"count": 2}
    tree["eval"] = {}
    tree["deepspeed"].update(zero_stage=args.zero, precision=args.precision)
    tree["scaling"]["num_workers"] = 1
    return validate_tree(tree, str(config))


def _rate(fn, batches: list[dict], warmup: int) -> float:
    for b in batches[:warmup]:
        fn(b)
    start = time.perf_counter()
    for b in batches[warmup:]:
        fn(b)
    return sum(b["image"].shape[0] for b in batches[warmup:]) / (time.perf_counter() - start)


def bench_training(args: argparse.Namespace, shards: str) -> tuple[float, float]:
    exp = _experiment(args, shards)
    loader, _ = make_train_loader(exp.data, build_tokenizer(exp.model), (0.5,) * 3, (0.5,) * 3, 0, 1, None)
    it = iter(loader)
    batches = [{k: next(it)[k] for k in ("image", "text")} for _ in range(args.steps)]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.precision]

    torch.manual_seed(0)
    model, _ = build_model(exp.model)
    opt = torch.optim.AdamW(model.parameters(), lr=exp.optim.lr, weight_decay=exp.optim.weight_decay)

    def plain(batch: dict) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(image=batch["image"], text=batch["text"])
        loss, _, _ = contrastive_loss(
            out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    plain_rate = _rate(plain, batches, warmup=3)

    return _engine_rate(exp, batches), plain_rate


def _engine_rate(exp, batches: list[dict]) -> float:
    """samples/s of the cliplab step (engine, objective, clamp) for this experiment's objective."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[exp.deepspeed.precision]
    torch.manual_seed(0)
    model, _ = build_model(exp.model)
    engine = build_engine(model, exp, world_size=1)
    objective = build_objective(exp.objective.name, exp.objective.params)

    def cliplab_step(batch: dict) -> None:
        cast = {k: v.to(dtype) if k in ("image", "views") else v for k, v in batch.items()}
        contrastive_step(engine, objective, [cast])
        clamp_logit_scale(engine, exp.model.max_logit_scale)

    return _rate(cliplab_step, batches, warmup=3)


def bench_objectives(args: argparse.Namespace, shards: str) -> tuple[float, float]:
    """(MCD samples/s, CLIP samples/s) on the same batches (MCD's carry its views)."""
    exp = _experiment(args, shards, "mcd")
    loader, _ = make_train_loader(exp.data, build_tokenizer(exp.model), (0.5,) * 3, (0.5,) * 3, 0, 1, None)
    it = iter(loader)
    keys = ("image", "text", "crop_box", "views", "view_boxes", "view_jitter")
    batches = [{k: b[k] for k in keys} for b in (next(it) for _ in range(args.steps))]
    return _engine_rate(exp, batches), _engine_rate(_experiment(args, shards, "clip"), batches)


def bench_holistic(args: argparse.Namespace, shards: str) -> dict[str, float]:
    """samples/s of each HOLISTIC config's step on the same batches (which carry all caption slots)."""
    exps = {name: _experiment(args, shards, None, path) for name, path in HOLISTIC.items()}
    first = next(iter(exps.values()))
    loader, _ = make_train_loader(first.data, build_tokenizer(first.model), (0.5,) * 3, (0.5,) * 3, 0, 1, None)
    it = iter(loader)
    keys = ("image", "text", "texts", "caption_own")
    batches = [{k: b[k] for k in keys} for b in (next(it) for _ in range(args.steps))]
    return {name: _engine_rate(exp, batches) for name, exp in exps.items()}


def bench_loading(args: argparse.Namespace, local: str, remote: str) -> tuple[float, float]:
    rates = []
    for shards in (remote, local):
        exp = _experiment(args, shards)
        loader, _ = make_train_loader(exp.data, build_tokenizer(exp.model), (0.5,) * 3, (0.5,) * 3, 0, 1, None)
        it = iter(loader)
        next(it)
        start = time.perf_counter()
        n = sum(next(it)["image"].shape[0] for _ in range(args.load_batches))
        rates.append(n / (time.perf_counter() - start))
    return rates[0], rates[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--load-batches", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as tmp, start_s3_server() as s3:
        os.environ.update(s3_env(s3.endpoint))
        create_bucket(s3.endpoint, "bench")
        spec = SynthSpec(num_samples=8000, samples_per_shard=1000, seed=0)
        write_synthscenes(f"{tmp}/shards", spec)
        write_synthscenes("s3://bench/shards", spec)
        local, remote = f"{tmp}/shards/{{00000..00007}}.tar", "s3://bench/shards/{00000..00007}.tar"

        _single_process_group()
        ours, plain = bench_training(args, local)
        mcd, clip = bench_objectives(args, local)
        holistic = bench_holistic(args, local)
        s3_rate, local_rate = bench_loading(args, local, remote)

    print(
        f"\ncliplab benchmarks (batch {args.batch}, ZeRO-{args.zero}, {args.precision}, "
        f"{torch.get_num_threads()} threads, demo model)"
    )
    print(f"{'measure':<34}{'cliplab':>12}{'baseline':>12}{'ratio':>8}")
    print(f"{'train samples/s (vs plain torch)':<34}{ours:>12.1f}{plain:>12.1f}{ours / plain:>8.2f}")
    print(f"{'MCD step time / CLIP step time':<34}{1 / mcd:>12.4f}{1 / clip:>12.4f}{clip / mcd:>8.2f}")
    vit_clip = holistic.pop("CLIP")
    for name, rate in holistic.items():
        print(f"{name + ' / CLIP step, ViT':<34}{1 / rate:>12.4f}{1 / vit_clip:>12.4f}{vit_clip / rate:>8.2f}")
    print(f"{'loader samples/s (S3 vs local)':<34}{s3_rate:>12.1f}{local_rate:>12.1f}{s3_rate / local_rate:>8.2f}")


if __name__ == "__main__":
    main()
