"""Class lists: AudioSet's 527 classes (shipped) and user lists in the same `index,mid,display_name` CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
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


def resolve_class_names(
    num_classes: int,
    checkpoint_names: Sequence[str] | None = None,
    store_names: Sequence[str] | None = None,
    *,
    placeholders: bool = True,
) -> list[str] | None:
    """Names of a model's `num_classes` outputs.

    The checkpoint's names first (they define the outputs, so a count that differs from the model's is an
    error), then the store's when their count fits, then AudioSet's for a 527-class model, then `class_<i>`,
    or None with `placeholders=False`.
    """
    if checkpoint_names is not None:
        if len(checkpoint_names) != num_classes:
            raise ValueError(
                f"checkpoint class_names has {len(checkpoint_names)} entries but the model has {num_classes}"
            )
        return list(checkpoint_names)
    if store_names is not None and len(store_names) == num_classes:
        return list(store_names)
    if num_classes == len(audioset_classes()):
        return list(audioset_classes().names)
    return [f"class_{i}" for i in range(num_classes)] if placeholders else None
