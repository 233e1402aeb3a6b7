"""Training curves: the per-epoch training loss and validation mAP of a run as a table and a chart.

The values come from the run itself (`engines.callbacks.TrainingCurves` records them each epoch), so the
chart is the same whichever logger the run uses (CSV, TensorBoard, W&B online or offline, none).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from os import PathLike

import fsspec

# What the chart shows, top panel first: the training loss, then the validation mAP.
CURVES = ("train/loss", "val/mAP")


def curve_series(records: Sequence[Mapping[str, float]], name: str) -> tuple[list[int], list[float]]:
    """The epochs and values of one curve (`name`, e.g. `val/mAP`) from per-epoch `records` (each with an
    `epoch` and the values that epoch had): only the epochs that have a finite value of it, in epoch order
    (a run validating every 3rd epoch has a val/mAP point every 3rd epoch)."""
    points = sorted(
        (int(record["epoch"]), float(record[name]))
        for record in records
        if name in record and record[name] is not None and math.isfinite(float(record[name]))
    )
    return [epoch for epoch, _ in points], [value for _, value in points]


def write_curves_csv(path: str | PathLike, records: Sequence[Mapping[str, float]]) -> None:
    """`epoch,<name>...`, one row per recorded epoch, empty where an epoch has no value of a column."""
    names = sorted({key for record in records for key in record if key != "epoch"})
    with fsspec.open(str(path), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *names])
        for record in sorted(records, key=lambda r: int(r["epoch"])):
            values = [record.get(name) for name in names]
            writer.writerow([int(record["epoch"]), *("" if v is None else f"{float(v):.6g}" for v in values)])


def plot_training_curves(
    path: str | PathLike, records: Sequence[Mapping[str, float]], names: Sequence[str] = CURVES
) -> None:
    """One panel per curve in `names` (epochs on x, shared), points marked (PNG, no display needed); a
    curve without a point says so in its panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 1, figsize=(7.0, 2.6 * len(names)), dpi=100, sharex=True)
    axes = [axes] if len(names) == 1 else list(axes)
    for axis, name in zip(axes, names):
        epochs, values = curve_series(records, name)
        axis.plot(epochs, values, marker="o", markersize=3, color="tab:blue")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
        if values:
            axis.set_title(f"{name}: last {values[-1]:.4f}, best {_best(name, values):.4f}", fontsize=9)
        else:
            axis.set_title(f"{name}: not recorded in this run", fontsize=9)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    with fsspec.open(str(path), "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def _best(name: str, values: list[float]) -> float:
    return min(values) if "loss" in name else max(values)
