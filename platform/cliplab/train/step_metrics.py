"""What a training step reports: loss and terms averaged over workers, lr, temperature, throughput, data health."""

from __future__ import annotations

import torch
import torch.distributed as dist

from cliplab.metrics import is_headline


def reduce_across(values: dict[str, float], world: int, op: str = "mean") -> dict[str, float]:
    """The mean (or sum) of each value over the `world` workers; every rank must call it (one all-reduce)."""
    if world == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    if op == "mean":
        t /= world
    return dict(zip(keys, t.tolist(), strict=True))


def step_metrics(
    losses: dict[str, float],
    lr: float,
    logit_scale: float,
    rates: dict[str, float],
    skipped: dict[str, int],
    flops: float | None,
    peak: float | None,
    world: int,
) -> dict[str, float]:
    """This step's metrics: the loss and its terms (`losses`) and rates averaged over workers, skipped samples
    and shards summed; achieved TFLOP/s (and MFU against `peak` per device) where FLOPs per sample are known."""
    m = reduce_across(losses, world)
    rates = reduce_across(rates, world)
    health = {f"data/skipped_{kind}": float(skipped.get(kind, 0)) for kind in ("samples", "shards")}
    m.update(rates, **reduce_across(health, world, op="sum"), lr=lr, logit_scale=logit_scale)
    if flops is not None:
        m["tflops_per_s"] = flops * rates["samples_per_s"] / 1e12
        if peak:
            m["mfu"] = flops * rates["samples_per_s"] / (peak * world)
    return m


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
    """One log line: step, loss, lr, temperature, throughput, data wait, TFLOP/s and MFU, then headline evals."""
    parts = [f"step {step}/{total}"]
    for key, fmt in (
        ("loss", "{:.4f}"),
        ("lr", "{:.2e}"),
        ("logit_scale", "{:.1f}"),
        ("samples_per_s", "{:.0f}"),
        ("data_wait_frac", "{:.0%}"),
        ("tflops_per_s", "{:.3g}"),
        ("mfu", "{:.1%}"),
    ):
        if key in m:
            parts.append(f"{key} " + fmt.format(m[key]))
    parts += [f"{k} {v:.3f}" for k, v in m.items() if is_headline(k)]
    return " | ".join(parts)
