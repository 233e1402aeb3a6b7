"""Tagging metrics against hand-computed values."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from ced_lightning.core.metrics import (
    TaggingMetrics,
    auc_per_class,
    average_precision_per_class,
    d_prime_from_auc,
    plot_per_class_ap,
    tagging_scores,
    write_per_class,
    write_per_class_csv,
)
from ced_lightning.core.objective import probabilities_from_logits


def _hand_ap(scores: list[float], labels: list[int]) -> float:
    """AP as the mean, over positives, of precision at each positive's rank (no ties in these examples)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if labels[i]:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


# 5 clips, 4 classes; class 3 has no positive and must not count towards mAP.
PROBS = torch.tensor(
    [
        [0.9, 0.1, 0.30, 0.5],
        [0.8, 0.7, 0.20, 0.4],
        [0.3, 0.6, 0.85, 0.3],
        [0.2, 0.2, 0.10, 0.2],
        [0.6, 0.9, 0.40, 0.1],
    ]
)
TARGETS = torch.tensor(
    [
        [1, 0, 0, 0],
        [0, 1, 1, 0],
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 1, 0],
    ]
)


def test_per_class_ap_matches_hand_computation():
    ap = average_precision_per_class(PROBS, TARGETS)
    for c in range(3):
        expected = _hand_ap(PROBS[:, c].tolist(), TARGETS[:, c].tolist())
        assert ap[c].item() == pytest.approx(expected, abs=1e-6)
    assert math.isnan(ap[3].item())
    # Class 0: positives at ranks 1 and 4 -> (1/1 + 2/4) / 2.
    assert ap[0].item() == pytest.approx(0.75, abs=1e-6)


def test_metric_excludes_classes_without_positives_and_accumulates_batches():
    metric = TaggingMetrics(num_classes=4)
    metric.update(PROBS[:2], TARGETS[:2])
    metric.update(PROBS[2:], TARGETS[2:])
    out = metric.compute()
    hand = [_hand_ap(PROBS[:, c].tolist(), TARGETS[:, c].tolist()) for c in range(3)]
    assert out["mAP"].item() == pytest.approx(sum(hand) / 3, abs=1e-6)
    assert out["positives"].tolist() == [2, 2, 2, 0]
    assert out["per_class_ap"].shape == (4,)
    assert math.isnan(out["per_class_ap"][3].item())


def test_auc_and_d_prime():
    auc = auc_per_class(PROBS, TARGETS)
    # Class 0: positives {0.9, 0.3}, negatives {0.8, 0.2, 0.6}: 4 of 6 pairs ordered -> 2/3.
    assert auc[0].item() == pytest.approx(4 / 6, abs=1e-6)
    assert math.isnan(auc[3].item())
    assert d_prime_from_auc(0.5).item() == pytest.approx(0.0, abs=1e-6)
    # Φ⁻¹(0.76025) = 0.7071..., so d' = 1.
    assert d_prime_from_auc(0.760249938).item() == pytest.approx(1.0, abs=1e-4)


def test_d_prime_of_perfect_and_random_scores():
    generator = torch.Generator().manual_seed(0)
    targets = (torch.rand(4000, 3, generator=generator) < 0.3).long()
    perfect = TaggingMetrics(num_classes=3)
    perfect.update(targets.float() * 0.5 + 0.25, targets)
    result = perfect.compute()
    assert result["mAP"].item() == pytest.approx(1.0)
    assert math.isinf(result["d_prime"].item()) and result["d_prime"].item() > 0

    random = TaggingMetrics(num_classes=3)
    random.update(torch.rand(4000, 3, generator=generator), targets)
    result = random.compute()
    assert abs(result["d_prime"].item()) < 0.1
    assert result["mAP"].item() == pytest.approx(0.3, abs=0.05)


def test_shape_errors_are_clear():
    metric = TaggingMetrics(num_classes=5)
    with pytest.raises(ValueError, match="expects 5 classes"):
        metric.update(PROBS, TARGETS)
    with pytest.raises(ValueError, match="same shape"):
        average_precision_per_class(PROBS, TARGETS[:, :2])


def test_csv_and_png(tmp_path):
    ap = average_precision_per_class(PROBS, TARGETS)
    names = ["dog", "cat", "bird", "never"]
    write_per_class_csv(tmp_path / "ap.csv", ap, names, TARGETS.sum(0))
    rows = list(csv.DictReader((tmp_path / "ap.csv").open()))
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[3] == {"index": "3", "name": "never", "ap": "", "positives": "0"}
    assert float(rows[0]["ap"]) == pytest.approx(0.75, abs=1e-6)
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        write_per_class_csv(tmp_path / "bad.csv", ap, names[:3], TARGETS.sum(0))

    plot_per_class_ap(tmp_path / "ap.png", ap, names, float(torch.nanmean(ap)))
    assert (tmp_path / "ap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    many = torch.rand(527)
    plot_per_class_ap(tmp_path / "many.png", many, None, many.mean())
    assert (tmp_path / "many.png").stat().st_size > 1000


def test_probabilities_from_logits_cast_before_the_sigmoid():
    """16-bit logits (mixed precision) become float32 probabilities without ties a bf16 sigmoid makes:
    evaluation (`evaluate`, the Lightning steps) ranks clips by these."""
    logits = torch.tensor([[8.0, 9.0, -7.0, -7.5]], dtype=torch.bfloat16)
    probs = probabilities_from_logits(logits)
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.sigmoid(logits.float()))
    assert len(set(probs[0].tolist())) == 4  # in bf16, sigmoid(8.0) == sigmoid(9.0) == 1.0
    assert torch.sigmoid(logits)[0, 0] == torch.sigmoid(logits)[0, 1]


def test_tagging_scores_and_per_class_files(tmp_path):
    metric = TaggingMetrics(num_classes=4)
    metric.update(PROBS, TARGETS)
    accumulated, at_once = metric.compute(), tagging_scores(PROBS, TARGETS)
    for key in ("mAP", "d_prime", "per_class_ap", "positives"):
        assert torch.equal(accumulated[key].nan_to_num(-1), at_once[key].nan_to_num(-1)), key
    # `evaluate`'s table and chart; the test step's table alone, under its prefix.
    paths = write_per_class(tmp_path / "eval", at_once, ["a", "b", "c", "d"])
    assert sorted(p.name for p in paths.values()) == ["per_class_ap.csv", "per_class_ap.png"]
    test_paths = write_per_class(tmp_path / "run", at_once, None, prefix="test_", chart=False)
    assert list(test_paths) == ["per_class_csv"] and sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "test_per_class_ap.csv"
    ]
    rows = list(csv.DictReader(test_paths["per_class_csv"].open()))
    assert [r["positives"] for r in rows] == [str(int(n)) for n in TARGETS.sum(0)]
