"""Audio tagging metrics: mAP, d-prime, and the per-class AP table and chart.

AudioSet convention: a class counts towards mAP only if the evaluation set has at least one positive for it
(AP is undefined otherwise), and towards AUC/d-prime only if it has both positives and negatives.
"""

from __future__ import annotations

import csv
import math
import warnings
from os import PathLike
from pathlib import Path

import fsspec
import torch
import torchmetrics
from torchmetrics.functional.classification import multilabel_auroc, multilabel_average_precision
from torchmetrics.utilities import dim_zero_cat

_SQRT2 = math.sqrt(2.0)


def _check_pair(probs: torch.Tensor, targets: torch.Tensor) -> None:
    if probs.ndim != 2 or probs.shape != targets.shape:
        raise ValueError(
            f"expected probabilities and targets of the same shape [clips, classes], "
            f"got {tuple(probs.shape)} and {tuple(targets.shape)}"
        )


def average_precision_per_class(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """AP of every class `[C]` (float32) from scores `[N, C]` and multi-hot targets `[N, C]`.

    Classes without a positive get NaN: their AP is undefined, and torchmetrics' placeholder value would
    otherwise leak into a mean.
    """
    _check_pair(probs, targets)
    targets = (targets > 0.5).long()
    with warnings.catch_warnings():
        # torchmetrics warns about each class without positives; we report those as NaN instead.
        warnings.filterwarnings("ignore", message="No positive samples")
        ap = multilabel_average_precision(
            probs.float(), targets, num_labels=probs.shape[1], average=None, thresholds=None
        ).float()
    return torch.where(targets.sum(0) > 0, ap, torch.full_like(ap, float("nan")))


def auc_per_class(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ROC AUC of every class `[C]`; NaN where a class has no positives or no negatives."""
    _check_pair(probs, targets)
    targets = (targets > 0.5).long()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No (positive|negative) samples")
        auc = multilabel_auroc(
            probs.float(), targets, num_labels=probs.shape[1], average=None, thresholds=None
        )
    positives = targets.sum(0)
    defined = (positives > 0) & (positives < targets.shape[0])
    return torch.where(defined, auc.float(), torch.full_like(auc.float(), float("nan")))


def d_prime_from_auc(auc: torch.Tensor | float) -> torch.Tensor:
    """d' = sqrt(2) * Φ⁻¹(AUC): the separation of two unit-variance Gaussians with that AUC."""
    auc = torch.as_tensor(auc, dtype=torch.float64)
    return (_SQRT2 * torch.special.ndtri(auc)).float()


def _nanmean(values: torch.Tensor) -> torch.Tensor:
    defined = ~torch.isnan(values)
    if not defined.any():
        return torch.tensor(float("nan"))
    return values[defined].mean()


class ProbabilityStates(torchmetrics.Metric):
    """Probabilities and targets of every clip, kept whole: ranking metrics (AP) need every score at once, so
    the states are lists concatenated across processes by torchmetrics; AudioSet's eval set (20k x 527
    floats) is about 40 MB. The base of `TaggingMetrics` and `single_label.SingleLabelMetrics`."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")


class TaggingMetrics(ProbabilityStates):
    """Accumulates probabilities and multi-hot targets; `compute()` gives mAP, d-prime and per-class AP."""

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        _check_pair(probs, targets)
        if probs.shape[1] != self.num_classes:
            raise ValueError(f"TaggingMetrics expects {self.num_classes} classes, got {probs.shape[1]}")
        self.probs.append(probs.detach().float())
        self.targets.append((targets.detach() > 0.5).to(torch.uint8))

    def compute(self) -> dict[str, torch.Tensor]:
        # After a DDP sync torchmetrics has already concatenated the list states into tensors.
        if isinstance(self.probs, list) and not self.probs:
            raise RuntimeError("TaggingMetrics.compute() called before any update()")
        probs = dim_zero_cat(self.probs)
        targets = dim_zero_cat(self.targets)
        per_class_ap = average_precision_per_class(probs, targets)
        auc = _nanmean(auc_per_class(probs, targets))
        return {
            "mAP": _nanmean(per_class_ap),
            "d_prime": d_prime_from_auc(auc),
            "per_class_ap": per_class_ap,
            "positives": targets.long().sum(0),
        }


def tagging_scores(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """`TaggingMetrics` of one set of scores `[N, C]` and multi-hot targets, computed at once:
    `{"mAP", "d_prime", "per_class_ap", "positives"}` (the Lightning steps accumulate the same metric)."""
    # One process's scores: never gathered over DDP ranks (on rank 0 alone it would wait for the others).
    metric = TaggingMetrics(probs.shape[1], sync_on_compute=False)
    metric.update(probs, targets)
    return metric.compute()


def write_per_class(
    folder: str | PathLike,
    scores: dict[str, torch.Tensor],
    class_names: list[str] | None,
    prefix: str = "",
    chart: bool = True,
) -> dict[str, Path]:
    """The per-class AP table of `scores` (`TaggingMetrics.compute`'s) as `<folder>/<prefix>per_class_ap.csv`
    and, with `chart`, its bar chart `.png`; returns the paths (`per_class_csv`, `per_class_png`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"per_class_csv": folder / f"{prefix}per_class_ap.csv"}
    write_per_class_csv(paths["per_class_csv"], scores["per_class_ap"], class_names, scores["positives"])
    if chart:
        paths["per_class_png"] = folder / f"{prefix}per_class_ap.png"
        plot_per_class_ap(paths["per_class_png"], scores["per_class_ap"], class_names, scores["mAP"])
    return paths


def write_per_class_csv(
    path: str | PathLike,
    per_class_ap: torch.Tensor,
    class_names: list[str] | None,
    positives: torch.Tensor,
) -> None:
    """Write `index,name,ap,positives`, one row per class in index order (ap empty where undefined)."""
    num_classes = len(per_class_ap)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{path}: {len(class_names)} class names for {num_classes} classes")
    with fsspec.open(str(path), "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "name", "ap", "positives"])
        for i in range(num_classes):
            ap = float(per_class_ap[i])
            writer.writerow(
                [
                    i,
                    class_names[i] if class_names is not None else "",
                    "" if math.isnan(ap) else f"{ap:.6f}",
                    int(positives[i]),
                ]
            )


def plot_per_class_ap(
    path: str | PathLike,
    per_class_ap: torch.Tensor,
    class_names: list[str] | None,
    mean_ap: float | torch.Tensor,
) -> None:
    """Bar chart of per-class AP, best first, with the mean AP as a line (PNG, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = per_class_ap.detach().cpu().double()
    defined = [i for i in range(len(ap)) if not math.isnan(float(ap[i]))]
    order = sorted(defined, key=lambda i: -float(ap[i]))
    names = [class_names[i] if class_names is not None else str(i) for i in order]
    values = [float(ap[i]) for i in order]
    mean_ap = float(mean_ap)
    many = len(order) > 60
    width = min(40.0, max(6.0, 0.25 * len(order)))
    fig, axis = plt.subplots(figsize=(width, 5.0), dpi=100)
    axis.bar(range(len(values)), values, width=1.0 if many else 0.8, color="tab:blue")
    axis.axhline(mean_ap, color="tab:red", linestyle="--", label=f"mAP {mean_ap:.4f}")
    axis.set_ylim(0.0, 1.0)
    axis.set_xlim(-0.5, len(values) - 0.5)
    axis.set_ylabel("average precision")
    axis.set_title(f"Per-class AP ({len(values)} classes with positives)")
    if many:
        # 527 tick labels are unreadable: name only the best and worst classes.
        axis.set_xticks([])
        for rank in [*range(min(10, len(order))), *range(max(10, len(order) - 10), len(order))]:
            axis.annotate(
                names[rank],
                (rank, values[rank]),
                rotation=90,
                fontsize=6,
                va="bottom",
                ha="center",
                xytext=(0, 2),
                textcoords="offset points",
            )
    else:
        axis.set_xticks(range(len(values)))
        axis.set_xticklabels(names, rotation=90, fontsize=7)
    axis.legend(loc="upper right")
    fig.tight_layout()
    with fsspec.open(str(path), "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def chance_map(targets: torch.Tensor) -> float:
    """The mAP that scores without information reach: a random ranking's AP of a class is about its
    prevalence (the share of clips it labels), so chance is the mean prevalence over the classes with a
    positive, the ones mAP averages (`TaggingMetrics`). NaN when no class has a positive."""
    if targets.ndim != 2:
        raise ValueError(f"expected targets [clips, classes], got shape {tuple(targets.shape)}")
    prevalence = (targets > 0.5).double().mean(0)
    return float(_nanmean(torch.where(prevalence > 0, prevalence, torch.full_like(prevalence, math.nan))))


def gain_over_chance(mean_ap: float, chance: float) -> float:
    """How far `mean_ap` lies from chance towards a perfect 1.0: 0 at chance, 1 when perfect, negative
    below chance (a scale that means the same with 527 rare classes as with 16 common ones)."""
    if not chance < 1.0:
        return math.nan
    return (float(mean_ap) - chance) / (1.0 - chance)
