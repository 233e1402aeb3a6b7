"""Supervised training with labels: teachers where no released weights exist."""

from __future__ import annotations

from typing import Any

import torch

from ced_lightning.core.augment import AugmentRecipe
from ced_lightning.core.losses import mix_with_reversed, supervised_loss
from ced_lightning.modules.tagging import TaggingModule, augmented_input


class SupervisedModule(TaggingModule):
    """BCE on multi-hot labels (`objective="multi_label"`) or cross-entropy on one class per clip
    (`"single_label"`), with the same spectrogram augmentation and mixup as distillation, drawn as
    for a student (`data.draws.ClipDraws`: fresh every epoch). Batches: `index`, `waveform`, `length`,
    `target`, `augment` and, with mixup, `mixup_lambda` (from `LabeledDataModule`)."""

    def __init__(self, *args: Any, recipe: AugmentRecipe | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe or AugmentRecipe()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        mel, lam = augmented_input(self.model.front_end, batch, self.recipe)
        target = batch["target"].float()
        if lam is not None:
            target = mix_with_reversed(target, lam)
        logits = self.model.forward_spectrogram(mel)
        loss = supervised_loss(self.objective, logits, target)
        self.log("train/loss", loss, prog_bar=True)
        return loss
