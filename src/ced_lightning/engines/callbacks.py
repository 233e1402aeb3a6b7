"""Lightning callbacks of this project."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ced_lightning.core.curves import plot_training_curves, write_curves_csv
from ced_lightning.core.errors import ConfigError
from ced_lightning.core.progress import ProgressLog, output_is_terminal

log = logging.getLogger(__name__)

AVERAGED_CHECKPOINT = "averaged.ckpt"


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors; integer buffers (BatchNorm's counter) from the first."""
    if not state_dicts:
        raise ValueError("nothing to average")
    keys = state_dicts[0].keys()
    for i, sd in enumerate(state_dicts[1:], 1):
        if sd.keys() != keys:
            raise ValueError(f"checkpoint {i} has other keys than checkpoint 0")
    averaged = {}
    for key in keys:
        first = state_dicts[0][key]
        if first.is_floating_point():
            averaged[key] = torch.stack([sd[key].float() for sd in state_dicts]).mean(0).to(first.dtype)
        else:
            averaged[key] = first.clone()
    return averaged


def save_whole(checkpoint: dict[str, Any], path: Path) -> None:
    """`torch.save` to a temporary name, then renamed: a signal mid-write leaves no half a checkpoint."""
    partial = path.with_name(f".{path.name}.partial")
    torch.save(checkpoint, partial)
    partial.replace(path)


class AverageBestCheckpoints(Callback):
    """At the end of fitting, average the weights of the `top_k` best checkpoints (the paper averages its 4
    best) and save them as `averaged.ckpt` beside them, a full checkpoint that every tool here reads.

    With `validate` (the default), `train` then validates the average and keeps the better of it and the best
    single checkpoint in `averaged.ckpt` (`fit_checkpoints.keep_better_of_average`): on a short, still rising
    run the 4 best span the whole curve and their mean can be worse than the best of them. `validate=false`
    keeps the plain average (the paper's).

    A run stopped with SIGTERM (a cluster's time limit or preemption; Lightning stops at the next batch)
    writes it from the best checkpoints saved so far, so a stopped run still leaves its averaged model
    (not validated).
    """

    def __init__(self, top_k: int = 4, validate: bool = True) -> None:
        self.top_k = top_k
        self.validate = validate
        self.path: Path | None = None
        # The checkpoints averaged, best first, and (rank 0 only) their epochs.
        self.sources: list[str] = []
        self.epochs: list[int | None] = []

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._average(trainer)
        trainer.strategy.barrier("average_best_checkpoints")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # No barrier: Lightning's launcher has already stopped the other ranks on SIGTERM.
        if not isinstance(exception, SIGTERMException):
            return
        if self._average(trainer) is None and trainer.is_global_zero:
            log.warning("stopped by SIGTERM before any checkpoint was saved: no %s", AVERAGED_CHECKPOINT)

    def _average(self, trainer: Trainer) -> Path | None:
        checkpoint_cb = trainer.checkpoint_callback
        if not isinstance(checkpoint_cb, ModelCheckpoint) or not checkpoint_cb.best_k_models:
            return None
        reverse = checkpoint_cb.mode == "max"
        ranked = sorted(checkpoint_cb.best_k_models.items(), key=lambda kv: float(kv[1]), reverse=reverse)
        paths = [path for path, _ in ranked[: self.top_k]]
        self.sources = [str(p) for p in paths]
        # Every rank learns the path (all of them test it next); rank 0 alone writes it.
        self.path = Path(paths[0]).parent / AVERAGED_CHECKPOINT
        if trainer.is_global_zero:
            checkpoints = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
            self.epochs = [c.get("epoch") for c in checkpoints]
            averaged = dict(checkpoints[0])
            averaged["state_dict"] = average_state_dicts([c["state_dict"] for c in checkpoints])
            averaged["averaged_from"] = [str(p) for p in paths]
            save_whole(averaged, self.path)
            log.info("averaged the weights of %d best checkpoints into %s", len(paths), self.path)
        return self.path


def format_epoch_line(
    epoch: int,
    max_epochs: int | None,
    metrics: Mapping[str, float],
    lr: float | None,
    seconds: float,
    step: int | None = None,
) -> str:
    """`epoch 2 (3 of 40, step 120): train/loss 0.1234  val/mAP 0.4321  lr 0.00012  12.3 s`: the epoch's
    index as in the checkpoint names (`epoch_002.ckpt`), then its count."""
    of = [f"{epoch + 1} of {max_epochs}"] if max_epochs is not None and max_epochs > 0 else []
    detail = ", ".join([*of, *([f"step {step}"] if step is not None else [])])
    head = f"epoch {epoch}" + (f" ({detail})" if detail else "")
    values = [f"{name} {value:.4f}" for name, value in metrics.items()]
    if lr is not None:
        values.append(f"lr {lr:.3g}")
    values.append(f"{seconds:.1f} s")
    return f"{head}: " + "  ".join(values)


class EpochLog(Callback):
    """One log line per training epoch (mean training loss, the epoch's validation metrics, learning rate,
    wall time), through `logging`, so it reaches the run's log file and a redirected stdout; within an epoch
    the training, validation and test batches done (`progress.ProgressLog`: count, rate, time left, every
    `CED_PROGRESS_SECONDS`).

    `when`: `not_tty` (the default: only when the output is not a terminal, where the rich progress bar
    writes nothing, e.g. `> run.log` or a batch job), `always`, or `never`.
    """

    WHEN = ("not_tty", "always", "never")

    def __init__(self, when: str = "not_tty") -> None:
        if when not in self.WHEN:
            raise ConfigError(f"callbacks.epoch_log.when must be one of {list(self.WHEN)}, not {when!r}")
        self.when = when
        self._started = 0.0
        self._loss = EpochLossMean()
        self._validated = False
        self._batches: dict[str, ProgressLog] = {}  # per stage: validation may run within a training epoch

    def _enabled(self, trainer: Trainer) -> bool:
        if not trainer.is_global_zero or self.when == "never":
            return False
        return self.when == "always" or not output_is_terminal()

    def _count_batches(self, trainer: Trainer, stage: str, total: Any) -> None:
        totals = total if isinstance(total, list) else [total]
        self._batches[stage] = ProgressLog(
            f"epoch {trainer.current_epoch} {stage}" if stage != "test" else "test",
            sum(totals),  # inf for a stream of unknown length: then the count and the rate only
            unit="batches",
            enabled=self._enabled(trainer),
        )

    def _batch_done(self, stage: str) -> None:
        if stage in self._batches:
            self._batches[stage].advance()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.monotonic()
        self._loss.reset()
        self._validated = False
        self._count_batches(trainer, "train", trainer.num_training_batches)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._count_batches(trainer, "validation", trainer.num_val_batches)

    def on_validation_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.sanity_checking:
            self._batch_done("validation")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._count_batches(trainer, "test", trainer.num_test_batches)

    def on_test_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        self._batch_done("test")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._loss.add(outputs)
        self._batch_done("train")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled(trainer):
            return
        metrics: dict[str, float] = {}
        if self._loss.mean() is not None:
            metrics["train/loss"] = self._loss.mean()
        if self._validated:  # otherwise the validation figures are an earlier epoch's
            metrics.update(validation_values(trainer))
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        line = format_epoch_line(
            trainer.current_epoch,
            trainer.max_epochs,
            metrics,
            lr,
            time.monotonic() - self._started,
            step=trainer.global_step,
        )
        log.info(line)


class EpochLossMean:
    """The mean of the training losses a module's `training_step` returned over one epoch (this process's
    batches): the per-epoch training loss of the epoch log and the training curves."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sum: torch.Tensor | None = None
        self._count = 0

    def add(self, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # Summed on the device: no synchronisation per step, one at the end of the epoch.
            value = loss.detach().float()
            self._sum = value if self._sum is None else self._sum + value
            self._count += 1

    def mean(self) -> float | None:
        return None if self._sum is None else float(self._sum) / self._count


def validation_values(trainer: Trainer) -> dict[str, float]:
    """The scalar `val/...` metrics the last validation logged."""
    return {
        name: float(value)
        for name, value in sorted(trainer.callback_metrics.items())
        if name.startswith("val/") and isinstance(value, torch.Tensor) and value.numel() == 1
    }


class TrainingCurves(Callback):
    """Records each training epoch's mean loss (`EpochLossMean`) and its validation metrics, and at the end
    of the fit (also one stopped by an exception, SIGTERM included) writes them as `training_curves.csv` and
    the chart `training_curves.png` (`core.curves`: train loss and val mAP per epoch) on rank 0, beside the
    checkpoints (the run folder without a checkpoint callback). The records travel in the checkpoints, so a
    resumed run's chart starts at its first epoch. Independent of the loggers: the same chart with CSV,
    TensorBoard, W&B (online or offline) or none."""

    def __init__(self, filename: str = "training_curves") -> None:
        self.filename = filename
        self.records: list[dict[str, float]] = []
        self._loss = EpochLossMean()
        self.paths: dict[str, Path] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(record) for record in self.records]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = [dict(record) for record in state_dict.get("records", [])]

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._loss.reset()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._loss.add(outputs)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here, not at the epoch's end: the checkpoint callbacks (Lightning runs them last) save this
        # epoch's checkpoint right after, and its records must hold this epoch.
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._record(trainer, validation_values(trainer))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record(trainer, {})

    def _record(self, trainer: Trainer, values: dict[str, float]) -> None:
        """Merge the epoch's mean loss so far and `values` into the record of the current epoch."""
        record = next((r for r in self.records if int(r["epoch"]) == trainer.current_epoch), None)
        if record is None:
            record = {"epoch": trainer.current_epoch}
            self.records.append(record)
        if self._loss.mean() is not None:
            record["train/loss"] = self._loss.mean()
        record.update(values)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        try:
            self._write(trainer)
        except Exception as error:  # the exception that stopped the run is the one to report
            log.warning("could not write the training curves: %s", error)

    def _write(self, trainer: Trainer) -> None:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.log_dir
        if not trainer.is_global_zero or not folder or not self.records:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = {"csv": folder / f"{self.filename}.csv", "png": folder / f"{self.filename}.png"}
        write_curves_csv(self.paths["csv"], self.records)
        plot_training_curves(self.paths["png"], self.records)
        log.info("training curves: %s", self.paths["png"])
