"""`averaged.ckpt` keeps the better of the average of the best checkpoints and the best single one, validated
once after the fit (`fit_checkpoints.keep_better_of_average`). Real Lightning runs of a one-weight model whose
validation score is known in closed form: gradient descent on (w - 1)^2 from w = 0, so the weights of each
epoch, and whether their mean beats the best of them, follow from the step size."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from ced_lightning.engines import fit_checkpoints
from ced_lightning.engines.callbacks import AverageBestCheckpoints
from ced_lightning.engines.fit_checkpoints import AVERAGING_RECORD, keep_better_of_average

TARGET = 1.0


class OneWeight(pl.LightningModule):
    """Validation score: -|w - 1|; one plain gradient step per epoch with step size `lr`."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.lr = lr

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return ((self.w - TARGET) ** 2).sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/score", -(self.w - TARGET).abs().sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader([torch.zeros(1)], batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([torch.zeros(1)], batch_size=1)


def _fit(tmp_path: Path, lr: float, validate: bool = True) -> tuple[pl.Trainer, OneWeight]:
    module = OneWeight(lr)
    trainer = pl.Trainer(
        max_epochs=6,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/score", mode="max", save_top_k=4),
            AverageBestCheckpoints(top_k=4, validate=validate),
        ],
    )
    trainer.fit(module)
    return trainer, module


def _weight(path: Path) -> float:
    return float(torch.load(path, map_location="cpu", weights_only=True)["state_dict"]["w"])


def test_a_rising_run_keeps_the_best_single_checkpoint_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Step 0.1: w = 1 - 0.8^(epoch + 1) rises to 1; the 4 best are the last 4, their mean lags the last.
    trainer, module = _fit(tmp_path, lr=0.1)
    folder = tmp_path / "checkpoints"
    plain_average = _weight(folder / "averaged.ckpt")
    with caplog.at_level(logging.INFO, logger="ced_lightning.engines.fit_checkpoints"):
        record = keep_better_of_average(trainer, module)
    assert record is not None and record["kept"] == "best single"
    assert record["averaged_epochs"] == [5, 4, 3, 2] and record["best_single_epoch"] == 5
    expected = [1 - 0.8 ** (epoch + 1) for epoch in (5, 4, 3, 2)]
    assert plain_average == pytest.approx(sum(expected) / 4, abs=1e-6)
    assert record["averaged_score"] == pytest.approx(-(1 - plain_average), abs=1e-6)
    assert record["best_single_score"] == pytest.approx(-(1 - expected[0]), abs=1e-6)
    kept = torch.load(folder / "averaged.ckpt", map_location="cpu", weights_only=True)
    assert kept["state_dict"]["w"].item() == pytest.approx(expected[0], abs=1e-6)
    assert kept["averaging"] == record and json.loads((folder / AVERAGING_RECORD).read_text()) == record
    assert fit_checkpoints.test_checkpoint(trainer, "averaged") == str(folder / "averaged.ckpt")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("averaged 4"))
    assert line.startswith("averaged 4 checkpoints (epochs 5, 4, 3, 2): val/score -0.")
    assert "best single (epoch 5): -0.2621; kept: best single (averaged.ckpt holds epoch 5's weights)" in line


def test_an_oscillating_run_keeps_the_average(tmp_path: Path) -> None:
    # Step 0.9: w - 1 = -(-0.8)^(epoch + 1), on alternate sides of 1; the mean of the last 4 is nearer.
    trainer, module = _fit(tmp_path, lr=0.9)
    folder = tmp_path / "checkpoints"
    average = _weight(folder / "averaged.ckpt")
    record = keep_better_of_average(trainer, module)
    assert record is not None and record["kept"] == "average"
    assert record["averaged_score"] > record["best_single_score"]
    assert _weight(folder / "averaged.ckpt") == average  # the average itself, now with its record
    assert torch.load(folder / "averaged.ckpt", weights_only=True)["averaging"]["kept"] == "average"


def test_validate_false_keeps_the_plain_average(tmp_path: Path) -> None:
    trainer, module = _fit(tmp_path, lr=0.1, validate=False)
    average = _weight(tmp_path / "checkpoints" / "averaged.ckpt")
    assert keep_better_of_average(trainer, module) is None
    assert _weight(tmp_path / "checkpoints" / "averaged.ckpt") == average
    assert not (tmp_path / "checkpoints" / AVERAGING_RECORD).exists()
