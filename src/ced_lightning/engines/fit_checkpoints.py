"""`train`'s checkpoint policy: the run options about checkpoints (`test_ckpt`, `ckpt_path`) checked before
anything long starts, a resumed fit checkpointing into its checkpoint's own folder, the best monitored value
over the run, which weights `averaged.ckpt` keeps (`keep_better_of_average`), and which checkpoint the test
after the fit evaluates."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ced_lightning.core.errors import ConfigError, MissingInputError
from ced_lightning.engines.callbacks import AverageBestCheckpoints, save_whole
from ced_lightning.engines.launch import check_multirun_ddp

log = logging.getLogger(__name__)


# Values of `test_ckpt`: which checkpoint of the fit `trainer.test` evaluates (see `test_checkpoint`).
TEST_CHECKPOINTS = ("best", "last", "averaged")
# `ckpt_path` values that Lightning resolves itself rather than reading a file.
_LIGHTNING_CKPT_NAMES = {"best", "last", "hpc"}


def check_run_options(cfg: DictConfig) -> None:
    """The train config's own switches (the checkpoint options, and the multirun guard of `launch`),
    checked before anything long starts (a typo found after a fit of hours loses the test of it)."""
    if cfg.test_ckpt not in TEST_CHECKPOINTS:
        raise ConfigError(f"test_ckpt must be one of {', '.join(TEST_CHECKPOINTS)}, not {cfg.test_ckpt!r}")
    ckpt_path = cfg.get("ckpt_path")
    if cfg.test and not cfg.train and not ckpt_path:
        raise ConfigError(
            "train=false test=true tests the weights of ckpt_path, but ckpt_path is null (that would test "
            "untrained weights): set ckpt_path=<run>/checkpoints/averaged.ckpt (or a best/last checkpoint)"
        )
    if _local_checkpoint_file(ckpt_path) and not Path(ckpt_path).is_file():
        raise MissingInputError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    if cfg.train:
        _refuse_fit_without_steps(cfg)
    check_multirun_ddp(cfg)


def _refuse_fit_without_steps(cfg: DictConfig) -> None:
    """A fit that can take no optimizer step exits 0 with untrained weights (and tests them, with no
    checkpoint to show for it): refused, naming the trainer option that stops it."""
    trainer = cfg.get("trainer") or {}
    stopping = [
        key for key in ("max_epochs", "max_steps", "limit_train_batches") if _is_zero(trainer.get(key))
    ]
    if _is_zero_time(trainer.get("max_time")):
        stopping.append("max_time")
    if not stopping:
        return
    key = stopping[0]
    setting = f"trainer.{key}={trainer.get(key)}"
    source = re.fullmatch(r"\$\{([\w.]+)\}", str(OmegaConf.to_container(trainer, resolve=False)[key]))
    if source:  # the default trainer takes max_epochs from the data's schedule
        setting += f" (from {source.group(1)})"
    raise ConfigError(
        f"{setting}: train=true would take no optimizer step and leave untrained weights (tested as if "
        "trained). Set it so that training runs, or test a trained checkpoint with train=false test=true "
        "ckpt_path=<checkpoint>"
    )


def _is_zero(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == 0


def _is_zero_time(value: object) -> bool:
    """Whether Lightning's `max_time` ("DD:HH:MM:SS", or a mapping of timedelta fields) is no time at all."""
    if isinstance(value, str):
        parts = value.split(":")
        return all(part.strip().isdigit() for part in parts) and all(int(part) == 0 for part in parts)
    if isinstance(value, Mapping) and value:
        return all(_is_zero(part) for part in value.values())
    return False


def _local_checkpoint_file(ckpt_path: str | None) -> bool:
    """Whether `ckpt_path` names a local file (not Lightning's "best"/"last"/"hpc", nor an fsspec URL)."""
    return bool(ckpt_path) and str(ckpt_path) not in _LIGHTNING_CKPT_NAMES and "://" not in str(ckpt_path)


def continue_in_checkpoint_folder(callbacks: list[Callback], ckpt_path: str | None) -> None:
    """Resuming from `ckpt_path`: checkpoint into its folder, not the new run's. Lightning restores a
    ModelCheckpoint's best-k bookkeeping (`best_k_models`, `best_model_score`) only into the same `dirpath`,
    and the averaged checkpoint and the sweep objective are built from that bookkeeping."""
    if not _local_checkpoint_file(ckpt_path):
        return
    folder = os.path.realpath(Path(ckpt_path).parent)  # as ModelCheckpoint resolves its own dirpath
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback.dirpath = folder
            log.info("resuming: checkpoints continue in %s (the folder of ckpt_path)", folder)
    # Expected when resuming into it; Lightning warns about it at every resume otherwise.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def best_monitored(trainer: pl.Trainer) -> dict[str, float]:
    """`{monitor: best value}` of the checkpoint callback over the whole run (a resumed one included): the
    best validation, where the last one is up to `patience` validations past it after early stopping.
    Empty without a monitored checkpoint callback or before any validation."""
    checkpoint_cb = trainer.checkpoint_callback
    if not isinstance(checkpoint_cb, ModelCheckpoint) or checkpoint_cb.best_model_score is None:
        return {}
    return {checkpoint_cb.monitor: float(checkpoint_cb.best_model_score)} if checkpoint_cb.monitor else {}


def test_checkpoint(trainer: pl.Trainer, which: str) -> str | None:
    """The checkpoint to test after fitting: `best`, `last` or `averaged` (falls back to best)."""
    checkpoint_cb = trainer.checkpoint_callback
    if not isinstance(checkpoint_cb, ModelCheckpoint):
        return None
    if which == "averaged":
        averaged = next((cb.path for cb in trainer.callbacks if isinstance(cb, AverageBestCheckpoints)), None)
        if averaged is not None and Path(averaged).is_file():
            return str(averaged)
        which = "best"
    if which not in TEST_CHECKPOINTS:
        raise ConfigError(f"test_ckpt must be one of {', '.join(TEST_CHECKPOINTS)}, not {which!r}")
    path = checkpoint_cb.best_model_path if which == "best" else checkpoint_cb.last_model_path
    return path or None


# Beside `averaged.ckpt`: what the validation of the average found and which weights the file holds.
AVERAGING_RECORD = "averaged.json"


def better_score(candidate: float, reference: float, mode: str) -> bool:
    """Whether `candidate` is at least as good as `reference` for a monitor of `mode` (`max` or `min`); NaN
    is never better."""
    return candidate >= reference if mode == "max" else candidate <= reference


def keep_better_of_average(
    trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule | None = None
) -> dict[str, Any] | None:
    """After the fit: validate the averaged weights (`AverageBestCheckpoints`) once, and leave in
    `averaged.ckpt` the better of them and the best single checkpoint (by the checkpoint callback's monitor,
    the average on a tie). Records the outcome in the checkpoint (`averaging`) and in `averaged.json` beside
    it, logs one line and returns the record; None where there is no averaged checkpoint to judge (no
    averaging callback, `validate=false`, no monitored validation) or it averages one checkpoint only."""
    averager = next((cb for cb in trainer.callbacks if isinstance(cb, AverageBestCheckpoints)), None)
    checkpoint_cb = trainer.checkpoint_callback
    if (
        averager is None
        or not averager.validate
        or averager.path is None
        or len(averager.sources) < 2
        or not isinstance(checkpoint_cb, ModelCheckpoint)
        or not checkpoint_cb.monitor
        or not checkpoint_cb.best_model_path
    ):
        return None
    monitor, mode = checkpoint_cb.monitor, checkpoint_cb.mode
    best_path = str(checkpoint_cb.best_model_path)
    best_score = float(checkpoint_cb.best_k_models.get(best_path, checkpoint_cb.best_model_score))
    loggers = trainer.loggers
    trainer.loggers = []  # a validation of other weights, not a point of the run's validation curve
    try:
        results = trainer.validate(module, datamodule=datamodule, ckpt_path=str(averager.path), verbose=False)
    finally:
        trainer.loggers = loggers
    averaged_score = float(results[0][monitor]) if results and monitor in results[0] else math.nan
    keep_average = better_score(averaged_score, best_score, mode)
    epochs = averager.epochs or [None] * len(averager.sources)
    best_epoch = dict(zip(averager.sources, epochs, strict=True)).get(best_path)
    record = {
        "monitor": monitor,
        "averaged_from": averager.sources,
        "averaged_epochs": epochs,
        "averaged_score": averaged_score if math.isfinite(averaged_score) else None,
        "best_single": best_path,
        "best_single_epoch": best_epoch,
        "best_single_score": best_score,
        "kept": "average" if keep_average else "best single",
    }
    if trainer.is_global_zero:
        kept = torch.load(averager.path if keep_average else best_path, map_location="cpu", weights_only=True)
        kept["averaged_from"] = averager.sources
        kept["averaging"] = record
        save_whole(kept, averager.path)
        averager.path.with_name(AVERAGING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        held = "the average" if keep_average else f"epoch {best_epoch}'s weights"
        log.info(
            "averaged %d checkpoints (epochs %s): %s %s; best single (epoch %s): %.4f; kept: %s "
            "(%s holds %s)",
            len(averager.sources),
            ", ".join(str(e) for e in epochs),
            monitor,
            f"{averaged_score:.4f}",
            best_epoch,
            best_score,
            record["kept"],
            averager.path.name,
            held,
        )
    trainer.strategy.barrier("keep_better_of_average")
    return record
