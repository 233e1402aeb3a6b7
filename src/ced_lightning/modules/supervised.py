"""Supervised training with labels: teachers where no released weights exist."""

from __future__ import annotations

from typing import Any

import torch

from ced_lightning.core.augment import AugmentRecipe, augmented_spectrogram, sample_augment_params
from ced_lightning.core.losses import mix_with_reversed, sample_mixup_lambda, supervised_loss
from ced_lightning.modules.tagging import TaggingModule


class SupervisedModule(TaggingModule):
    """BCE on multi-hot labels (`objective="multi_label"`) or cross-entropy on one class per clip
    (`"single_label"`), with the same spectrogram augmentation (fresh draws every epoch) and mixup
    as distillation. Batches: `index`, `waveform`, `length`, `target` (from `LabeledDataModule`)."""

    def __init__(
        self,
        *args: Any,
        recipe: AugmentRecipe | None = None,
        mixup: float | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe or AugmentRecipe()
        self.mixup = mixup or None
        self.seed = seed

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        index, length = batch["index"].cpu().numpy(), batch["length"].cpu().numpy()
        params = sample_augment_params(self.recipe, self.seed, self.current_epoch, index, length)
        mel = augmented_spectrogram(
            self.model.front_end, batch["waveform"], batch["length"], params, self.recipe
        )
        target = batch["target"].float()
        if self.mixup:
            lam = torch.from_numpy(sample_mixup_lambda(self.seed, self.current_epoch, index, self.mixup)).to(
                mel
            )
            mel, target = mix_with_reversed(mel, lam), mix_with_reversed(target, lam)
        logits = self.model.forward_spectrogram(mel)
        loss = supervised_loss(self.objective, logits, target)
        self.log("train/loss", loss, prog_bar=True)
        return loss
