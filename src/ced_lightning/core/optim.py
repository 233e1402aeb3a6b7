"""Optimiser set-up shared by every training task: parameter groups and the warm-up + cosine schedule."""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

from ced_lightning.core.errors import ConfigError


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


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    head: nn.Module | None = None,
    encoder_lr: float | None = None,
) -> list[dict]:
    """Weight decay on matrices only: not on biases, norms, or names in `model.no_weight_decay()`.

    With `encoder_lr`, every trainable parameter outside `head` (the encoder) gets that learning rate in
    groups of its own; the head's keep the optimiser's. Frozen parameters (`requires_grad=False`) are left
    out.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    in_head = {id(p) for p in head.parameters()} if head is not None and encoder_lr is not None else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim <= 1 or name in skip)
        encoder = encoder_lr is not None and id(param) not in in_head
        groups.setdefault((encoder, decays), []).append(param)
    result = []
    for (encoder, decays), params in sorted(groups.items(), key=lambda item: (item[0][0], not item[0][1])):
        group: dict = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if encoder:
            group["lr"] = encoder_lr
        result.append(group)
    return result


def freeze_all_but(model: nn.Module, head: nn.Module) -> None:
    """A linear probe: every parameter of `model` outside `head` stops training (`requires_grad=False`)."""
    in_head = {id(p) for p in head.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in in_head)


def build_optimizer(
    make_optimizer: Callable[..., torch.optim.Optimizer],
    model: nn.Module,
    weight_decay: float | None = None,
    head: nn.Module | None = None,
    encoder_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """`make_optimizer` is a partial (Hydra `_partial_: true`) taking params; its weight decay applies to
    matrices only. With `encoder_lr_scale` other than 1, the parameters outside `head` train at the
    optimiser's lr times it (fine-tuning: a pretrained encoder moves less than a new head)."""
    keywords = getattr(make_optimizer, "keywords", {})
    decay = keywords.get("weight_decay", 0.0) if weight_decay is None else weight_decay
    encoder_lr = None
    if encoder_lr_scale != 1.0:
        if head is None or "lr" not in keywords:
            raise ConfigError(
                f"optim.encoder_lr_scale={encoder_lr_scale} needs a model with a classifier head "
                "(get_classifier) and an optimiser with an lr (optim.optimizer.lr)"
            )
        encoder_lr = float(keywords["lr"]) * encoder_lr_scale
    if decay or encoder_lr is not None:
        params: Iterable = parameter_groups(model, decay, head, encoder_lr)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
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
