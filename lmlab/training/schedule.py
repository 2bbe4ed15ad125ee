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
    """Every group at `lr`, times its `lr_scale` (make_optimizer's group of parameters that learn faster)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.AdamW:
    # Weight decay on matrices (linear weights, embeddings) only, never on biases or norm gains.
    # A parameter with an `lr_scale` attribute (ELMo's ScalarMix) learns at that multiple of the LR, undecayed.
    params = [p for p in model.parameters() if p.requires_grad]
    plain = [p for p in params if getattr(p, "lr_scale", 1.0) == 1.0]
    groups = [{"params": [p for p in plain if p.dim() >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in plain if p.dim() < 2], "weight_decay": 0.0}]
    for scale in sorted({p.lr_scale for p in params if getattr(p, "lr_scale", 1.0) != 1.0}):
        groups.append({"params": [p for p in params if getattr(p, "lr_scale", 1.0) == scale], "weight_decay": 0.0,
                       "lr_scale": scale})
    # The fused kernel does one pass over all parameters instead of one small op per tensor.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
