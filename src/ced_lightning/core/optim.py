"""Optimiser set-up shared by every training task: parameter groups and the warm-up + cosine schedule."""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable, Iterable
from functools import partial

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


def paper_warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning-rate factor of the original CED code: pytorch-ignite 0.4.9's `create_lr_scheduler_with_warmup`
    (from 0) around a `CosineAnnealingScheduler` from 1 to `min_lr_ratio` with cycle `epochs x epoch_length`,
    i.e. `total_steps`, the run's whole length with the warm-up.

    Ignite's cosine starts at the warm-up's end value, so the warm-up ends one step early: steps 0..W-2 rise
    as `step / (W - 1)` (step 0 at 0), and the cosine runs from step W-1 over `total_steps` steps, so the
    run's last step is still above `min_lr_ratio`. The cycle restarts at 1 after `total_steps` cosine steps,
    as ignite's does (never within a run of `total_steps` steps).
    """
    ramp = warmup_steps - 1
    if ramp >= 1 and step < ramp:
        return step / ramp
    progress = ((step - max(ramp, 0)) % total_steps) / total_steps
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# `optim.schedule`: ours (every recipe but the paper's) or the original code's (`optim=paper`).
SCHEDULES: dict[str, Callable[..., float]] = {"warmup_cosine": warmup_cosine, "paper": paper_warmup_cosine}


def lr_factor(
    schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> Callable[[int], float]:
    """The step -> learning-rate factor of `schedule` (a SCHEDULES key) for a run of `total_steps` steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {sorted(SCHEDULES)}, not {schedule!r}")
    return partial(
        SCHEDULES[schedule],
        warmup_steps=warmup_steps,
        total_steps=max(1, total_steps),
        min_lr_ratio=min_lr_ratio,
    )


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


def adam8bit_or_adam(params: Iterable, **kwargs: float) -> torch.optim.Optimizer:
    """The paper's optimiser, bitsandbytes' 8-bit Adam, where it can run; plain `torch.optim.Adam` elsewhere.

    For recipes that should run anywhere (`optim=paper`): 8-bit Adam needs bitsandbytes (the `paper` extra)
    and CUDA parameters. Its state is quantised blockwise, so the two differ slightly in the last digits of
    the updates; the warning says which one runs so a reproduction log shows it.
    """
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    reason = None
    if importlib.util.find_spec("bitsandbytes") is None:
        reason = "bitsandbytes is not installed (pip install 'ced-lightning[paper]')"
    elif not on_cuda:
        reason = "the parameters are not on a CUDA device"
    if reason is None:
        import bitsandbytes

        return bitsandbytes.optim.Adam8bit(params, **kwargs)
    warnings.warn(
        f"optim=paper: using torch.optim.Adam instead of the paper's 8-bit Adam: {reason}", stacklevel=2
    )
    return torch.optim.Adam(params, **kwargs)
