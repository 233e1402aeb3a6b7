"""The student: learns from the teachers' stored top-k outputs alone, seeing each clip exactly as they did."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ced_lightning.core.augment import AugmentRecipe
from ced_lightning.core.losses import DistillLoss, distill_loss
from ced_lightning.core.targets import TargetFill, rebuild_targets
from ced_lightning.modules.tagging import TaggingModule, augmented_input


class StudentDistillModule(TaggingModule):
    """Distillation from a logit store (batches from `DistillDataModule`).

    A training batch carries `waveform`, `length`, the teachers' `topk_indices`/`topk_probs`, the
    augmentation parameters `augment` (the stored ones, or fresh draws when not consistent) and, with
    mixup, the per-clip `mixup_lambda`. The same `augmented_spectrogram` as on the teacher side builds the
    student's input, so the replay is bit-identical.
    """

    def __init__(
        self,
        *args: Any,
        recipe: AugmentRecipe | None = None,
        num_classes: int | None = None,
        loss: DistillLoss = "kl",
        temperature: float = 1.0,
        target_fill: TargetFill = "zero",
        label_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe or AugmentRecipe()
        self.num_classes = num_classes or self.model.num_classes
        self.loss_kind = loss
        self.temperature = temperature
        self.target_fill = target_fill
        self.label_weight = label_weight

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        mel, lam = augmented_input(self.model.front_end, batch, self.recipe)
        teacher = rebuild_targets(
            batch["topk_indices"], batch["topk_probs"], self.num_classes, self.target_fill
        )
        logits = self.model.forward_spectrogram(mel)

        loss = _mixed(lambda t: distill_loss(self.loss_kind, logits, t, self.temperature), teacher, lam)
        self.log("train/distill_loss", loss, prog_bar=True)
        if self.label_weight:
            labels = batch["target"].float()
            supervised = _mixed(
                lambda t: F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none").mean(-1),
                labels,
                lam,
            )
            self.log("train/label_loss", supervised)
            loss = loss + self.label_weight * supervised
        self.log("train/loss", loss)
        return loss


def _mixed(per_sample_loss, target: torch.Tensor, lam: torch.Tensor | None) -> torch.Tensor:
    """Mixup's loss: λ·L(y) + (1-λ)·L(y reversed), per clip, averaged over the batch."""
    if lam is None:
        return per_sample_loss(target).mean()
    return (lam * per_sample_loss(target) + (1 - lam) * per_sample_loss(target.flip(0))).mean()
