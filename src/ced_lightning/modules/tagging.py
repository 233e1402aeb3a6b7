"""What supervised teachers and distilled students share: the network, optimisation, evaluation on
labeled stores, and checkpoint metadata. Maths lives in `optim`, `losses`, `targets`, `metrics`."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from ced_lightning.core.augment import AugmentParams, AugmentRecipe, augmented_spectrogram
from ced_lightning.core.errors import ConfigError
from ced_lightning.core.losses import mix_with_reversed
from ced_lightning.core.metrics import TaggingMetrics, write_per_class
from ced_lightning.core.objective import Objective, check_objective, probabilities_from_logits
from ced_lightning.core.optim import build_optimizer, freeze_all_but, lr_factor
from ced_lightning.core.single_label import SingleLabelMetrics, write_confusion_matrix
from ced_lightning.models.checkpoint import restore_rng_states, write_metadata

log = logging.getLogger(__name__)


class TaggingModule(LightningModule):
    """An audio tagger `self.model` (plain nn.Module: CED or a timm backbone on log-mel).

    Subclasses implement `training_step`. Validation and test compute mAP and d-prime on labeled batches
    (`waveform`, `length`, `target`), with the EMA weights when `ema_decay` is set, from the probabilities
    and per-class table `evaluate` uses (`objective.probabilities_from_logits`, `metrics.write_per_class`).
    `objective="single_label"` scores softmax probabilities and adds accuracy, top-k accuracy and, at test
    time, the confusion matrix (`core.single_label`). Fine-tuning: `freeze_encoder` trains the classifier
    head alone (a linear probe; the encoder also stays in eval mode, so its BatchNorm statistics hold),
    `encoder_lr_scale` scales the encoder's learning rate against the head's.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        ema_decay: float | None = None,
        class_names: Sequence[str] | None = None,
        lr_schedule: str = "warmup_cosine",
        objective: Objective = "multi_label",
        freeze_encoder: bool = False,
        encoder_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.objective = check_objective(objective)
        self.freeze_encoder = freeze_encoder
        self.encoder_lr_scale = float(encoder_lr_scale)
        if freeze_encoder:
            freeze_all_but(model, _classifier(model))
        self.model = model
        self.make_optimizer = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.lr_schedule = lr_schedule
        self.ema_decay = ema_decay
        self.ema = _frozen_copy(model) if ema_decay else None
        self.class_names = list(class_names) if class_names else None
        self.val_metrics = TaggingMetrics(model.num_classes)
        self.test_metrics = TaggingMetrics(model.num_classes)
        single = objective == "single_label"
        self.val_single = SingleLabelMetrics(model.num_classes) if single else None
        self.test_single = SingleLabelMetrics(model.num_classes) if single else None

    def train(self, mode: bool = True) -> TaggingModule:
        super().train(mode)
        if mode and self.freeze_encoder:
            # A frozen encoder also keeps its BatchNorm statistics and skips dropout: only the head moves.
            self.model.eval()
            _classifier(self.model).train()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning never calls `train()` here: it restores each submodule's captured mode after validation.
        if self.freeze_encoder:
            self.train()

    # -- evaluation -------------------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        return self.ema if self.ema is not None else self.model

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.eval_model(waveform)

    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: TaggingMetrics, single: Any) -> None:
        probs = probabilities_from_logits(self(batch["waveform"]), self.objective)
        metrics.update(probs, batch["target"])
        if single is not None:
            single.update(probs, batch["target"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self.val_single)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics, self.val_single)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_single)

    def on_test_epoch_end(self) -> None:
        result = self._log_metrics("test", self.test_metrics, self.test_single)
        folder = getattr(self.trainer.checkpoint_callback, "dirpath", None) or self.trainer.log_dir
        if self.trainer.is_global_zero and folder:
            # Next to the checkpoints, where a reader of the results looks for it.
            paths = write_per_class(folder, result, self.class_names, prefix="test_", chart=False)
            log.info("per-class AP table: %s", paths["per_class_csv"])
            if "confusion" in result:
                paths = write_confusion_matrix(folder, result["confusion"], self.class_names, prefix="test_")
                log.info("confusion matrix: %s", paths["confusion_csv"])

    def _log_metrics(self, stage: str, metrics: TaggingMetrics, single: Any = None) -> dict[str, Any]:
        result = metrics.compute()
        metrics.reset()
        logged = {f"{stage}/mAP": result["mAP"], f"{stage}/d_prime": result["d_prime"]}
        if single is not None:
            scores = single.compute()
            single.reset()
            result["confusion"] = scores.pop("confusion")
            logged.update({f"{stage}/{name}": value for name, value in scores.items()})
        # already synchronised by torchmetrics
        self.log_dict(logged, prog_bar=True, sync_dist=False)
        return result

    # -- optimisation -----------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(
            self.make_optimizer,
            self.model,
            head=_classifier(self.model) if self.encoder_lr_scale != 1.0 else None,
            encoder_lr_scale=self.encoder_lr_scale,
        )
        # Lightning's estimate: max_epochs x (batches per epoch after `limit_train_batches`, over
        # `accumulate_grad_batches`), capped by `max_steps`. It builds epoch 0's training loader to count.
        total = int(self.trainer.estimated_stepping_batches)
        if self.trainer.ckpt_path:
            # Here the checkpoint's loop state is not restored yet (restored after configure_optimizers).
            _rebuild_train_loader_after_restore(self.trainer)
        factor = lr_factor(self.lr_schedule, self.warmup_steps, total, self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            with torch.no_grad():
                for ema, current in zip(self.ema.state_dict().values(), self.model.state_dict().values()):
                    if ema.is_floating_point():
                        ema.lerp_(current, 1.0 - self.ema_decay)
                    else:
                        ema.copy_(current)

    # -- checkpoints ------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # `eval_prefix`: the attribute whose weights are evaluated (`self.ema` when kept, else `self.model`).
        eval_prefix = "ema." if self.ema is not None else "model."
        write_metadata(checkpoint, self.model, self.class_names, eval_prefix=eval_prefix)
        # How the outputs read: sigmoids per class (multi_label) or one softmax (single_label).
        checkpoint["objective"] = self.objective

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer  # None in `load_from_checkpoint`
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            # Strategies that restore after setup (FSDP, DeepSpeed) call configure_optimizers before this,
            # when `trainer.ckpt_path` is not known yet: drop the loader it built here instead.
            _rebuild_train_loader_after_restore(trainer)
        # The torch generator is restored before the first training batch, and only what happens at the same
        # point of an uninterrupted run draws from it until then: `ResumableLoader` iterates without drawing
        # (its own generator), the sanity check runs under Lightning's `isolate_rng`.
        restore_rng_states(checkpoint)


def _rebuild_train_loader_after_restore(trainer: Trainer) -> None:
    """Have the fit loop build its training loader again after it restores the checkpoint's loop state.

    `estimated_stepping_batches` builds the loader before the restore (so for epoch 0), and the fit loop keeps
    a loader it already has unless it reloads for a new epoch: resumed in epoch 0 (or without
    `reload_dataloaders_every_n_epochs`), it would never receive the checkpoint's loader state, train the
    epoch's first batches again and drop the rest (Lightning issue #20550). Without a loader, the fit loop
    builds one for the restored epoch and loads the saved state into it, as it does without the estimate.
    """
    trainer.fit_loop._combined_loader = None


def augmented_input(
    front_end: nn.Module, batch: dict[str, Any], recipe: AugmentRecipe
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training batch's network input as its per-clip draws say (`data.draws.ClipDraws`): the
    spectrograms augmented with `augment`, mixed with the batch reversed by `mixup_lambda` when it has one;
    and that λ (None without mixup), for mixing the targets alike."""
    params = AugmentParams.from_torch(batch["augment"])
    mel = augmented_spectrogram(front_end, batch["waveform"], batch["length"], params, recipe)
    lam = batch.get("mixup_lambda")
    if lam is None:
        return mel, None
    lam = lam.to(mel)
    return mix_with_reversed(mel, lam), lam


def _classifier(model: nn.Module) -> nn.Module:
    if not hasattr(model, "get_classifier"):
        raise ConfigError(
            f"{type(model).__name__} has no classifier head (get_classifier) to train apart from its "
            "encoder: optim.freeze_encoder and optim.encoder_lr_scale need one"
        )
    return model.get_classifier()


def _frozen_copy(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model).eval()
    for param in ema.parameters():
        param.requires_grad_(False)
    return ema
