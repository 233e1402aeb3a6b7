"""Single-label classification metrics (one class per clip): accuracy, top-k accuracy and the confusion
matrix, from torchmetrics, and the confusion matrix as a CSV table and a PNG chart.

Targets arrive as the one-hot rows the labeled stores give (`LabeledDataModule`); the true class is each
row's largest entry (`argmax`), the prediction the largest probability.
"""

from __future__ import annotations

import csv
from os import PathLike
from pathlib import Path

import fsspec
import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix
from torchmetrics.utilities import dim_zero_cat

from ced_lightning.core.metrics import ProbabilityStates

# Top-k accuracy's k (the convention of ImageNet-style tables); reported only with more than k classes,
# where it says something top-1 does not.
TOP_K = 5


def top_k_for(num_classes: int) -> int | None:
    """The k of the top-k accuracy reported for `num_classes` classes, or None when k would cover them."""
    return TOP_K if num_classes > TOP_K else None


def single_label_scores(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracy, top-k accuracy (`top_k_for`) and the confusion matrix of scores `[N, C]` against one-hot
    targets `[N, C]`: `{"acc", "top5_acc" (more than 5 classes), "confusion"}`. The confusion matrix is
    int64 `[C, C]`, rows the true classes, columns the predicted ones."""
    if probs.ndim != 2 or probs.shape != targets.shape:
        raise ValueError(
            f"expected probabilities and targets of the same shape [clips, classes], "
            f"got {tuple(probs.shape)} and {tuple(targets.shape)}"
        )
    num_classes = probs.shape[1]
    truth = targets.argmax(dim=1)
    probs = probs.float()
    scores = {
        # micro: the share of clips whose top class is right, the plain accuracy
        "acc": multiclass_accuracy(probs, truth, num_classes=num_classes, average="micro"),
        "confusion": multiclass_confusion_matrix(probs, truth, num_classes=num_classes).long(),
    }
    k = top_k_for(num_classes)
    if k is not None:
        scores[f"top{k}_acc"] = multiclass_accuracy(
            probs, truth, num_classes=num_classes, average="micro", top_k=k
        )
    return scores


class SingleLabelMetrics(ProbabilityStates):
    """Accumulates probabilities and one-hot targets; `compute()` gives `single_label_scores`."""

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        if probs.shape[-1] != self.num_classes:
            raise ValueError(f"SingleLabelMetrics expects {self.num_classes} classes, got {probs.shape[-1]}")
        self.probs.append(probs.detach().float())
        self.targets.append(targets.detach().float())

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.probs, list) and not self.probs:
            raise RuntimeError("SingleLabelMetrics.compute() called before any update()")
        return single_label_scores(dim_zero_cat(self.probs), dim_zero_cat(self.targets))


def write_confusion_matrix(
    folder: str | PathLike, confusion: torch.Tensor, class_names: list[str] | None, prefix: str = ""
) -> dict[str, Path]:
    """`<folder>/<prefix>confusion_matrix.csv` (a row per true class, a column per predicted class, clip
    counts) and its chart `.png`; returns their paths (`confusion_csv`, `confusion_png`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = confusion.detach().cpu().long()
    names = class_names if class_names is not None else [str(i) for i in range(counts.shape[0])]
    if len(names) != counts.shape[0]:
        raise ValueError(f"{folder}: {len(names)} class names for a {tuple(counts.shape)} confusion matrix")
    paths = {
        "confusion_csv": folder / f"{prefix}confusion_matrix.csv",
        "confusion_png": folder / f"{prefix}confusion_matrix.png",
    }
    with fsspec.open(str(paths["confusion_csv"]), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *names])
        for name, row in zip(names, counts.tolist(), strict=True):
            writer.writerow([name, *row])
    plot_confusion_matrix(paths["confusion_png"], counts, names)
    return paths


def plot_confusion_matrix(path: str | PathLike, counts: torch.Tensor, names: list[str]) -> None:
    """The confusion matrix as a heat map, each row scaled by its clips (so rare classes read as well as
    common ones), counts written in the cells when there are few classes (PNG, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = counts.double()
    share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    size = min(40.0, max(5.0, 0.35 * len(names) + 2))
    fig, axis = plt.subplots(figsize=(size, size), dpi=100)
    image = axis.imshow(share.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    axis.set_xticks(range(len(names)))
    axis.set_yticks(range(len(names)))
    axis.set_xticklabels(names, rotation=90, fontsize=7)
    axis.set_yticklabels(names, fontsize=7)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    accuracy = float(counts.diagonal().sum() / counts.sum().clamp_min(1))
    axis.set_title(f"Confusion matrix (accuracy {accuracy:.4f}, rows scaled to 1)")
    if len(names) <= 30:
        for i in range(len(names)):
            for j in range(len(names)):
                if counts[i, j]:
                    color = "white" if share[i, j] > 0.5 else "black"
                    axis.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with fsspec.open(str(path), "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
