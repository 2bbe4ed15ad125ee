"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, t, elapsed: float | None = None) -> float:
    """Linear warmup to t.lr over t.warmup_steps, then cosine decay to t.min_lr at t.max_steps.

    With a time_limit the whole schedule also runs on the clock: the run is as far along as the larger of its
    steps and its share of the time (as in Geiping & Goldstein's "Cramming"), so warmup takes
    warmup_steps / max_steps of the time and the decay the rest, and a run that makes fewer steps than planned
    (a loaded machine) still warms up and anneals before it is stopped, instead of ending inside its warmup. Such
    a schedule depends on the machine's speed; leave time_limit unset for bit-exact reproducibility."""
    position = float(step)
    if t.time_limit and elapsed is not None:
        position = max(position, elapsed / t.time_limit * t.max_steps)  # the clock, counted in steps
    if position < t.warmup_steps:
        return t.lr * min(1.0, (position + 1) / t.warmup_steps)
    progress = min(1.0, (position - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.AdamW:
    # Weight decay on matrices (linear weights, embeddings) only, never on biases or norm gains.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # The fused kernel does one pass over all parameters instead of one small op per tensor.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
