"""Optimiser set-up shared by every training task: parameter groups and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up from 0 to 1 over `warmup_steps`, then cosine decay to
    `min_lr_ratio` at `total_steps` (held there afterwards)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, or names in `model.no_weight_decay()`."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    make_optimizer: Callable[..., torch.optim.Optimizer], model: nn.Module, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """`make_optimizer` is a partial (Hydra `_partial_: true`) taking params; its weight decay applies to
    matrices only."""
    keywords = getattr(make_optimizer, "keywords", {})
    decay = keywords.get("weight_decay", 0.0) if weight_decay is None else weight_decay
    params: Iterable = parameter_groups(model, decay) if decay else model.parameters()
    return make_optimizer(params)
