"""Class lists: AudioSet's 527 classes (shipped) and user lists in the same `index,mid,display_name` CSV,
the names a model's outputs get (`resolve_class_names`), and the one check that two lists are the same
(`class_list_difference`, `check_same_classes`: count, names and order)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from os import PathLike

import fsspec

from ced_lightning import resources_dir
from ced_lightning.core.errors import InputError

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
        raise InputError(f"{path}: expected a CSV with columns index,mid,display_name")
    rows.sort(key=lambda row: int(row["index"]))
    if [int(row["index"]) for row in rows] != list(range(len(rows))):
        raise InputError(f"{path}: class indices must be 0..{len(rows) - 1} without gaps")
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
            raise InputError(
                f"checkpoint class_names has {len(checkpoint_names)} entries but the model has {num_classes}"
            )
        return list(checkpoint_names)
    if store_names is not None and len(store_names) == num_classes:
        return list(store_names)
    if num_classes == len(audioset_classes()):
        return list(audioset_classes().names)
    return [f"class_{i}" for i in range(num_classes)] if placeholders else None


def class_list_difference(
    first: Sequence[str] | None,
    second: Sequence[str] | None,
    *,
    sources: tuple[str, str],
    counts: tuple[int | None, int | None] = (None, None),
    unnamed_matches: bool = True,
) -> str | None:
    """None when two class lists are the same; otherwise their first difference in words, naming both
    `sources` (`"A has 4 classes, B has 5"`, `"class 2 is 'Dog' in A, 'Cat' in B"`).

    A list is its names, or only its count where unnamed (None; `counts` gives counts beside or instead of
    names). An unnamed list matches a named one of its count, unless `unnamed_matches` is off (stores read
    as one, which must carry the same list).
    """
    lengths = [
        count if count is not None else (len(names) if names is not None else None)
        for names, count in zip((first, second), counts)
    ]
    if None not in lengths and lengths[0] != lengths[1]:  # an unnamed list of unknown count has any
        return f"{sources[0]} has {lengths[0]} classes, {sources[1]} has {lengths[1]}"
    if first is None or second is None:
        if (first is None and second is None) or unnamed_matches:
            return None
        named = sources[0] if first is not None else sources[1]
        return f"only {named} names its classes"
    if len(first) != len(second):
        return f"{sources[0]} names {len(first)} classes, {sources[1]} names {len(second)}"
    for c, (a, b) in enumerate(zip(first, second)):
        if a != b:  # same count, other names or another order: results would be silently wrong
            return f"class {c} is {a!r} in {sources[0]}, {b!r} in {sources[1]}"
    return None


def check_same_classes(
    first: Sequence[str] | None,
    second: Sequence[str] | None,
    *,
    sources: tuple[str, str],
    message: str,
    advice: str = "",
    counts: tuple[int | None, int | None] = (None, None),
    unnamed_matches: bool = True,
) -> None:
    """Raise ValueError `"{message} ({first difference}); {advice}"` when the two class lists differ
    (`class_list_difference`); `message` says what cannot go together, `advice` what to do."""
    difference = class_list_difference(
        first, second, sources=sources, counts=counts, unnamed_matches=unnamed_matches
    )
    if difference is not None:
        raise InputError(f"{message} ({difference})" + (f"; {advice}" if advice else ""))


def single_label_problem(label_counts: Sequence[int], clip_names: Sequence[str]) -> str | None:
    """None when every clip has exactly one label; otherwise the first clip that has not, in words
    (`"clip 'dog/3' has 2 labels"`) with how many more share the problem."""
    wrong = [i for i, count in enumerate(label_counts) if int(count) != 1]
    if not wrong:
        return None
    first = wrong[0]
    more = f" (and {len(wrong) - 1} more clips without exactly one)" if len(wrong) > 1 else ""
    return f"clip {clip_names[first]!r} has {int(label_counts[first])} labels{more}"
