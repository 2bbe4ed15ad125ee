"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, t, elapsed: float | None = None) -> float:
    """Linear warmup to t.lr, then cosine decay to t.min_lr at t.max_steps.

    With a time_limit, the decay also follows the clock (progress is the larger of steps and seconds used, as in
    Geiping & Goldstein's "Cramming"), so a run that is slower than planned still anneals before it is stopped.
    Such a schedule depends on the machine's speed; leave time_limit unset for bit-exact reproducibility."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    if t.time_limit and elapsed is not None:
        progress = max(progress, elapsed / t.time_limit)
    progress = min(1.0, progress)
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
