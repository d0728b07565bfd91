"""DeepSpeed engine assembly and the contrastive step with gradient accumulation.

DeepSpeed's own accumulation sums per-micro-batch losses, which shrinks the negatives of a contrastive
loss to one micro-batch. `contrastive_step` keeps them global (open_clip's scheme): embed every
micro-batch without gradient, then recompute each with gradient against the cached features of the
others, so the summed gradients equal those of the loss over the whole accumulated batch.
"""

from __future__ import annotations

import math
from typing import Any

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

from cliplab.config import Experiment
from cliplab.models.compute import compile_blocks, set_grad_checkpointing
from cliplab.models.zero3 import full_shape
from cliplab.objectives.registry import Objective

NO_DECAY_HINTS = ("bias", "ln", "norm", "bn", "logit_scale", "positional_embedding", "class_embedding")


# Bucket sizes in elements. ZeRO-1/2: gradients are reduced in 50M-element buckets as backward produces them
# (`overlap_comm`; a bucket is a contiguous buffer, `contiguous_gradients`), not in one 500M-element bucket
# after it. ZeRO-3: at most ~2 large matrices gathered at once, so a worker holds its partition plus
# about one layer's full weights instead of every gathered parameter, and the optimizer steps its partition
# in sub-groups of ~10M elements (`sub_group_size`; DeepSpeed's 1e9 steps it whole), so the fp32 gradients
# and the update's temporaries exist for one sub-group at a time.
ZERO12_DEFAULTS: dict[str, Any] = {
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": 5e7,
    "allgather_bucket_size": 5e7,
}
ZERO3_DEFAULTS: dict[str, Any] = {
    "overlap_comm": True,
    "contiguous_gradients": True,
    "reduce_bucket_size": 1e7,
    "stage3_prefetch_bucket_size": 1e7,
    "stage3_max_live_parameters": 3e7,
    "stage3_max_reuse_distance": 3e7,
    "stage3_param_persistence_threshold": 1e5,
    "sub_group_size": 1e7,
}


def deepspeed_config(exp: Experiment, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this experiment; `deepspeed.overrides` is deep-merged last.

    On a single worker ZeRO-1/2 partitioning is switched off (`zero_stage_for`), and so are its defaults.
    """
    ds = exp.deepspeed
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": exp.data.batch_size,
        "gradient_accumulation_steps": exp.train.accum_steps,
        "train_batch_size": exp.data.batch_size * exp.train.accum_steps * world_size,
        "zero_optimization": {"stage": ds.zero_stage, **_stage_defaults(ds.zero_stage)},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        "gradient_clipping": ds.grad_clip,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    cfg = _merge(cfg, ds.overrides)
    stage = zero_stage_for(cfg["zero_optimization"], world_size)
    if stage != cfg["zero_optimization"]["stage"]:
        cfg["zero_optimization"] = {"stage": stage}
    return cfg


def _stage_defaults(stage: int) -> dict[str, Any]:
    return {0: {}, 1: ZERO12_DEFAULTS, 2: ZERO12_DEFAULTS, 3: ZERO3_DEFAULTS}[stage]


def zero_stage_for(zero: dict[str, Any], world_size: int) -> int:
    """The ZeRO stage the engine runs: the configured one, but 0 for ZeRO-1/2 on one worker without offload.

    Partitioning over one rank saves no memory (ZeRO-1/2 even keep a second flat fp32 copy), yet DeepSpeed
    0.19.8 still copies every gradient bucket through an all-reduce into the partition at world size 1
    (`allreduce_and_scatter`). At stage 0 the engine's own all-reduce is then switched off too
    (`build_engine`). Optimizer offload at one rank is ZeRO-Offload, and ZeRO-3 builds and fetches the model
    one partitioned module at a time (what param offload needs): both are kept as configured.
    """
    stage = int(zero.get("stage", 0))
    offload = isinstance(zero.get("offload_optimizer"), dict) and zero["offload_optimizer"].get("device") != "none"
    return 0 if world_size == 1 and stage in (1, 2) and not offload else stage


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's split: no weight decay on gains, biases, embeddings and the temperature (full shapes at ZeRO-3)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if len(full_shape(p)) < 2 or any(h in name for h in NO_DECAY_HINTS) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def partition_config(exp: Experiment, world_size: int) -> dict[str, Any] | None:
    """The DeepSpeed config to build the model under when ZeRO-3 partitions it at construction, else None."""
    cfg = deepspeed_config(exp, world_size)
    return cfg if cfg["zero_optimization"]["stage"] == 3 else None


def lr_lambda(exp: Experiment):
    """Linear warmup to lr, then cosine to lr * min_lr_ratio (or constant), as a function of the step."""
    o, total = exp.optim, exp.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def optimizer_kind(exp: Experiment) -> str:
    """`compute.optimizer` resolved: auto is DeepSpeed's FusedAdam on GPU runs and torch AdamW on CPU runs."""
    choice = exp.compute.optimizer
    if choice == "auto":
        return "fused" if exp.scaling.use_gpu else "torch"
    return choice


def build_optimizer(model: torch.nn.Module, exp: Experiment) -> torch.optim.Optimizer:
    """AdamW over open_clip's decay groups: torch's, or DeepSpeed's FusedAdam (one multi-tensor CUDA kernel)."""
    o = exp.optim
    groups = param_groups(model, o.weight_decay)
    if optimizer_kind(exp) == "fused":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def build_engine(model: torch.nn.Module, exp: Experiment, world_size: int) -> deepspeed.DeepSpeedEngine:
    """Wrap the model with AdamW (`compute.optimizer`) and a warmup+cosine schedule, then apply `compute`.

    Checkpointing is switched on before `deepspeed.initialize`; `compute.compile` runs after it, in place, so
    the compiled graphs see the engine's dtype, device and hooks and every parameter keeps its name. The
    backend is `compute.compile_backend`, else the accelerator's (inductor unless `set_compile_backend` chose another).
    At world size 1 and stage 0 the engine skips its gradient all-reduce (`enable_backward_allreduce`, the
    flag DeepSpeed itself clears when it has no backend): over one rank it only flattens, copies, divides by 1.
    """
    set_grad_checkpointing(model, exp.compute.grad_checkpointing)
    optimizer = build_optimizer(model, exp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(exp))
    config = deepspeed_config(exp, world_size)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if world_size == 1 and config["zero_optimization"]["stage"] == 0:  # no flatten + all-reduce + copy-back
        engine.enable_backward_allreduce = False
    dtype = next(engine.module.parameters()).dtype
    for buffer in engine.module.buffers():  # DeepSpeed casts parameters only; batch-norm statistics must follow
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
    # read now: engine.compile's default was bound at import
    backend = exp.compute.compile_backend or get_accelerator().get_compile_backend()
    if exp.compute.compile == "model":
        engine.compile(backend=backend)  # DeepSpeed 0.19.8: `engine.module.compile(backend=...)`, in place
    elif exp.compute.compile == "blocks":
        compile_blocks(engine.module, backend=backend)
    return engine


def clamp_logit_scale(engine: deepspeed.DeepSpeedEngine, max_scale: float) -> float:
    """Clamp the temperature in the fp32 master copy (an in-place clamp of the module param is lost).

    Without a master copy (ZeRO-0 in fp32, e.g. on one worker) the module parameter is the master and is
    clamped itself. Collective at ZeRO-3: every rank must call it. Returns exp(logit_scale) after clamping.
    """
    param = engine.module.logit_scale
    full = safe_get_full_fp32_param(param)
    master = full is not None
    if not master:
        full = param.detach().float()
    bound = math.log(max_scale)
    if full.max().item() > bound or full.min().item() < 0:
        full = full.clamp(0, bound)
        if master:
            safe_set_full_fp32_param(param, full)
        else:
            with torch.no_grad():
                param.copy_(full)
    return float(full.exp().max())


def contrastive_step(
    engine: deepspeed.DeepSpeedEngine, objective: Objective, micro_batches: list[dict[str, Any]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step over the micro-batches with global negatives; returns (loss, terms), detached."""
    if len(micro_batches) == 1:
        feats, scale = _embed(engine, objective, micro_batches[0])
        loss, terms = objective.loss(feats, scale, micro_batches[0])
        engine.backward(loss)
        engine.step()
        objective.after_step(engine)
        return loss.detach(), terms

    with torch.no_grad():
        cached = [_embed(engine, objective, mb)[0] for mb in micro_batches]
    merged_batch = _concat_batches(micro_batches)
    share = 1.0 / len(micro_batches)
    for j, mb in enumerate(micro_batches):
        fresh, scale = _embed(engine, objective, mb)
        feats = {k: torch.cat([fresh[k] if i == j else c[k] for i, c in enumerate(cached)]) for k in fresh}
        # every micro-step sees the whole loss through the temperature: count its gradient once in total
        scale = scale.detach() + share * (scale - scale.detach())
        loss, terms = objective.loss(feats, scale, merged_batch)
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
    objective.after_step(engine)
    return loss.detach(), terms


def _embed(
    engine: deepspeed.DeepSpeedEngine, objective: Objective, batch: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    feats, scale = objective.embed(engine, batch)
    return {k: v.float() for k, v in feats.items()}, scale.float()


def _concat_batches(batches: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, first in batches[0].items():
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat([b[key] for b in batches])
        elif isinstance(first, list):
            out[key] = [x for b in batches for x in b[key]]
    return out


def full_state_dict(engine: deepspeed.DeepSpeedEngine) -> dict[str, torch.Tensor]:
    """The fp32 weights of the whole model (collective at ZeRO-3; every rank must call it)."""
    params = dict(engine.module.named_parameters())
    buffers = dict(engine.module.named_buffers())
    state = {}
    for name in engine.module.state_dict():  # persistent entries only, in open_clip's order
        if name in params:
            full = safe_get_full_fp32_param(params[name])
            state[name] = (full if full is not None else params[name].detach().float()).cpu().clone()
        else:
            state[name] = buffers[name].detach().cpu().clone()
    return state
