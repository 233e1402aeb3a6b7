"""The per-clip draws of a training batch, for both tasks: augmentation parameters and mixup λ.

A teacher (task=supervised) and a student (task=distill) get them the same way, here, in the DataLoader
worker: counter-based in (seed, epoch, row) (`core.rng`), so neither worker count, batch order nor rank
changes what a clip gets, and the Lightning module only applies what its batch carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ced_lightning.core.augment import AugmentParams, AugmentRecipe, sample_augment_params
from ced_lightning.core.losses import sample_mixup_lambda


def without_shift(params: AugmentParams) -> AugmentParams:
    """`params` with every clip's time shift set to 0 (the other fields as they are)."""
    return AugmentParams({**params.values, "shift": np.zeros_like(params.values["shift"])})


@dataclass(frozen=True)
class ClipDraws:
    """Adds `augment` (each clip's augmentation parameters) and, with `mixup` (Beta(α, α)), `mixup_lambda`
    to a training batch of rows `index` with `length` samples.

    The parameters are the rows of `replay` when given (consistent teaching replays the teachers' stored
    ones), else drawn from `recipe` under `seed + augment_seed_offset` for `epoch` (without the time shift
    when `shift` is false). λ is drawn under `seed` itself.
    """

    recipe: AugmentRecipe
    seed: int
    epoch: int
    mixup: float | None = None
    replay: AugmentParams | None = None
    augment_seed_offset: int = 0
    shift: bool = True

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        index = batch["index"].numpy()
        if self.replay is not None:
            params = self.replay.subset(index)
        else:
            seed = self.seed + self.augment_seed_offset
            params = sample_augment_params(self.recipe, seed, self.epoch, index, batch["length"].numpy())
            if not self.shift:
                params = without_shift(params)
        batch["augment"] = params.to_torch()
        if self.mixup:
            batch["mixup_lambda"] = torch.from_numpy(
                sample_mixup_lambda(self.seed, self.epoch, index, self.mixup)
            )
        return batch
