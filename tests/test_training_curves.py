"""Training curves and the TensorBoard logger: a tiny real run writes TensorBoard event files with its
training loss, and `training_curves.png`/`.csv` beside its checkpoints from the run's own per-epoch values."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

from ced_lightning import compose_config
from ced_lightning.core.curves import curve_series, plot_training_curves
from conftest import tiny_student_overrides

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_curve_series_keeps_the_epochs_that_have_a_value_in_epoch_order() -> None:
    records = [
        {"epoch": 2, "train/loss": 0.5, "val/mAP": 0.3},
        {"epoch": 0, "train/loss": 0.9},
        {"epoch": 1, "train/loss": 0.7, "val/mAP": float("nan")},
        {"epoch": 3, "train/loss": 0.4, "val/mAP": 0.35},
    ]
    assert curve_series(records, "train/loss") == ([0, 1, 2, 3], [0.9, 0.7, 0.5, 0.4])
    assert curve_series(records, "val/mAP") == ([2, 3], [0.3, 0.35])
    assert curve_series(records, "val/d_prime") == ([], [])


def test_curves_chart_is_a_png_with_one_point_per_recorded_epoch(tmp_path: Path) -> None:
    import matplotlib.image

    records = [{"epoch": e, "train/loss": 1.0 / (e + 1), "val/mAP": 0.1 * e} for e in range(5)]
    records[2].pop("val/mAP")
    path = tmp_path / "curves.png"
    plot_training_curves(path, records)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (700, 520)  # 7 x 2.6 inches per panel, 2 panels, 100 dpi


def _tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(folder.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {folder}"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_logger_and_training_curves_of_a_tiny_run(
    tiny_demo: dict[str, str], tmp_path: Path
) -> None:
    from ced_lightning.train import train

    overrides = [
        *tiny_student_overrides(tiny_demo),
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "data.num_workers=0",
        "data.clip_seconds=1.0",
        "trainer=cpu",
        "debug=limit",
        "trainer.max_epochs=3",
        "trainer.log_every_n_steps=1",
        "test=false",
        "logger=tensorboard",
        "callbacks.progress_bar=null",
    ]
    train(compose_config(overrides, output_dir=tmp_path))

    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert len(scalars["train/loss"]) == 3 * 3  # 3 epochs of 3 batches, logged every step
    assert len(scalars["val/mAP"]) == 3
    assert not (tmp_path / "csv").exists()  # logger=tensorboard alone

    folder = tmp_path / "checkpoints"
    assert (folder / "training_curves.png").read_bytes()[:8] == PNG_SIGNATURE
    with open(folder / "training_curves.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2]
    # The run's own values: each epoch's val/mAP is the one TensorBoard got, the loss the mean of its steps.
    assert [float(row["val/mAP"]) for row in rows] == pytest.approx(scalars["val/mAP"], rel=1e-5)
    steps = scalars["train/loss"]
    means = [sum(steps[3 * e : 3 * e + 3]) / 3 for e in range(3)]
    assert [float(row["train/loss"]) for row in rows] == pytest.approx(means, rel=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_logger_without_the_package_names_the_extra() -> None:
    from ced_lightning.core.errors import ConfigError
    from ced_lightning.engines.trainer import build_loggers

    with pytest.raises(ConfigError, match=r"logger\.tensorboard .*ced-lightning\[tensorboard\]"):
        build_loggers(compose_config(["logger=tensorboard"]))
