"""Class lists: AudioSet's 527 classes (shipped) and user lists in the same `index,mid,display_name` CSV."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from os import PathLike

import fsspec

from ced_lightning import resources_dir

AUDIOSET_CLASS_LABELS = resources_dir() / "class_labels_indices.csv"


@dataclass(frozen=True)
class ClassList:
    mids: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def index_of_mid(self) -> dict[str, int]:
        return {mid: i for i, mid in enumerate(self.mids)}


def read_class_labels(path: str | PathLike = AUDIOSET_CLASS_LABELS) -> ClassList:
    """Read a `index,mid,display_name` CSV (AudioSet's `class_labels_indices.csv` format)."""
    with fsspec.open(str(path), "r", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a CSV with columns index,mid,display_name")
    rows.sort(key=lambda row: int(row["index"]))
    if [int(row["index"]) for row in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: class indices must be 0..{len(rows) - 1} without gaps")
    return ClassList(tuple(row["mid"] for row in rows), tuple(row["display_name"] for row in rows))


@lru_cache(maxsize=1)
def audioset_classes() -> ClassList:
    """AudioSet's 527 classes in the order of the released CED checkpoints' outputs."""
    return read_class_labels(AUDIOSET_CLASS_LABELS)
