"""Learning-rate schedule and optimizer construction.

Linear warmup then cosine decay from `starting_lr` to `min_lr` over the run; a fixed rate
with `disable_lr_schedule`. The schedule is a pure function of the step, so resuming a run
(or overriding the schedule with new rates) only needs the step number.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total_steps: int, starting_lr: float, min_lr: float, warmup_steps: int,
          disabled: bool = False) -> float:
    if disabled:
        return starting_lr
    if warmup_steps > 0 and step < warmup_steps:
        return starting_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (starting_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on vectors, norms, embeddings and memory tables."""
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        table = any(part in name for part in ("embed", "deepembed", "memory.keys", "memory.values"))
        (no_decay if param.ndim < 2 or table else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused or None)
