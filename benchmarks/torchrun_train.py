"""Train a cliplab experiment's workload under torchrun without Ray: plain DDP, or cliplab's DeepSpeed step.

    torchrun --nproc_per_node 2 benchmarks/torchrun_train.py CONFIG.yaml --engine ddp|deepspeed

Both engines read batches with cliplab's reader and train the experiment's model with the symmetric InfoNCE
loss (features gathered with gradient from every rank), AdamW with open_clip's weight-decay split, the
warmup+cosine schedule, gradient clipping and the temperature clamp. `ddp` is the minimal torch loop;
`deepspeed` is cliplab's engine and `contrastive_step` at the config's ZeRO stage. Rank 0 prints cliplab's
progress lines (`[rank 0] step K/N`); every rank ends with a `BENCH {json}` line: its peak RSS, its RSS
before the model was built (the imported libraries: the same on every side) and the bytes of parameters and
optimizer state it holds.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cliplab.config import Experiment, load_experiment
from cliplab.data.pipeline import make_train_loader
from cliplab.data.tokenize import build_tokenizer
from cliplab.models.factory import build_model
from cliplab.objectives import build_objective
from cliplab.objectives.clip import contrastive_loss
from cliplab.train.engine import (
    build_engine,
    clamp_logit_scale,
    contrastive_step,
    lr_lambda,
    param_groups,
    partition_config,
)
from cliplab.train.worker import DTYPES, Worker

Step = Callable[[dict[str, Any]], None]


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def held_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def state_tensors(module: torch.nn.Module, optimizer: Any) -> list[torch.Tensor]:
    """This rank's parameters (its ZeRO-3 partition), the optimizer's own (fp32 master) parameters and its state."""
    inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
    tensors = [getattr(p, "ds_tensor", p.data) for p in module.parameters()]
    tensors += [p for group in inner.param_groups for p in group["params"]]
    return tensors + [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]


def ddp_trainer(exp: Experiment, module: torch.nn.Module) -> tuple[torch.nn.Module, Any, Step]:
    """(module, optimizer, step) for the minimal DDP loop."""
    model = DistributedDataParallel(module)
    o = exp.optim
    opt = torch.optim.AdamW(param_groups(model.module, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(exp))
    bound = math.log(exp.model.max_logit_scale)

    def step(batch: dict[str, Any]) -> None:
        out = model(image=batch["image"], text=batch["text"])
        loss, _, _ = contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), exp.deepspeed.grad_clip)
        opt.step()
        schedule.step()
        with torch.no_grad():
            model.module.logit_scale.clamp_(0, bound)

    return model.module, opt, step


def deepspeed_trainer(exp: Experiment, module: torch.nn.Module, world: int) -> tuple[torch.nn.Module, Any, Step]:
    """(module, optimizer, step) for cliplab's engine and step."""
    engine = build_engine(module, exp, world)
    objective = build_objective(exp.objective.name, exp.objective.params)

    def step(batch: dict[str, Any]) -> None:
        contrastive_step(engine, objective, [batch])
        clamp_logit_scale(engine, exp.model.max_logit_scale)

    return engine.module, engine.optimizer, step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--engine", choices=["ddp", "deepspeed"], required=True)
    args = p.parse_args()
    exp = load_experiment(args.config)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(exp.train.torch_threads or 1)
    torch.manual_seed(exp.train.seed)
    start_rss = rss_bytes()
    model, pre = build_model(exp.model, partition_config(exp, world) if args.engine == "deepspeed" else None)
    module, optimizer, step = ddp_trainer(exp, model) if args.engine == "ddp" else deepspeed_trainer(exp, model, world)
    loader, _ = make_train_loader(exp.data, build_tokenizer(exp.model), pre.mean, pre.std, rank, world, None)
    batches = iter(loader)
    worker = Worker(rank, world, torch.device("cpu"), DTYPES[exp.deepspeed.precision])  # images as a Ray worker casts
    for k in range(1, exp.train.steps + 1):
        batch = next(batches)
        step(worker.to_device({"image": batch["image"], "text": batch["text"]}))
        if rank == 0 and (k % exp.train.log_every == 0 or k == exp.train.steps):
            print(f"[rank 0] step {k}/{exp.train.steps}", flush=True)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    state = held_bytes(state_tensors(module, optimizer))
    result = {"rank": rank, "peak_rss_bytes": peak_rss, "start_rss_bytes": start_rss, "state_bytes": state}
    print("BENCH " + json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
