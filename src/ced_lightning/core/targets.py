"""Rebuilding dense soft targets from a teacher's stored top-k outputs."""

from __future__ import annotations

from typing import Literal

import torch

from ced_lightning.core.errors import ConfigError

TargetFill = Literal["zero", "last_mean"]


def rebuild_targets(
    indices: torch.Tensor, probs: torch.Tensor, num_classes: int, fill: TargetFill = "zero"
) -> torch.Tensor:
    """Top-k `(indices [B, k], probs [B, k])` -> dense teacher probabilities `[B, num_classes]`.

    Stored classes get their dequantized probability. Every other class gets 0 (`zero`, what the released
    recipes use) or the smallest stored probability divided by the number of unstored classes
    (`last_mean`: the teacher's mass below the top-k, spread evenly, bounded by what was cut off).
    Softening the result at a temperature T != 1 (`losses.soften`) treats the fill as if the teachers had
    output it, so it distorts these targets; the paper distils at T = 1.
    """
    if indices.shape != probs.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and probs {tuple(probs.shape)} differ in shape")
    k = indices.shape[-1]
    if fill == "zero" or k >= num_classes:
        base = probs.new_zeros(*probs.shape[:-1], num_classes)
    elif fill == "last_mean":
        rest = probs.min(dim=-1, keepdim=True).values / (num_classes - k)
        base = rest.expand(*probs.shape[:-1], num_classes).clone()
    else:
        raise ConfigError(f"distill.target_fill must be 'zero' or 'last_mean', not {fill!r}")
    return base.scatter_(-1, indices.long(), probs)
