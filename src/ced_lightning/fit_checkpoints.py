"""`train`'s checkpoint policy: the run options about checkpoints (`test_ckpt`, `ckpt_path`) checked before
anything long starts, a resumed fit checkpointing into its checkpoint's own folder, the best monitored value
over the run, and which checkpoint the test after the fit evaluates."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from ced_lightning.callbacks import AverageBestCheckpoints
from ced_lightning.errors import ConfigError, MissingInputError
from ced_lightning.launch import check_multirun_ddp

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
