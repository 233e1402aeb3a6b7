"""Class lists (labels.py): the one identity check, its messages, and the call sites that use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ced_lightning.core.labels import check_same_classes, class_list_difference
from ced_lightning.store import AudioStore
from ced_lightning.store.audio_writer import write_audio_store
from ced_lightning.store.concat import ConcatAudioStore

AB = ("A", "B")


def test_same_lists_and_unnamed_lists_of_one_count_match() -> None:
    assert class_list_difference(["dog", "cat"], ["dog", "cat"], sources=AB) is None
    assert class_list_difference(None, None, sources=AB, counts=(3, 3)) is None
    assert class_list_difference(["dog", "cat"], None, sources=AB, counts=(None, 2)) is None
    assert class_list_difference(None, ["dog", "cat"], sources=AB) is None  # no names, no count: anything


def test_first_difference_names_both_sources() -> None:
    assert class_list_difference(["dog", "cat"], ["dog"], sources=AB) == "A has 2 classes, B has 1"
    assert class_list_difference(None, ["dog"], sources=AB, counts=(2, None)) == "A has 2 classes, B has 1"
    # same vocabulary in another order: the first position that differs
    assert class_list_difference(["dog", "cat", "cow"], ["dog", "cow", "cat"], sources=AB) == (
        "class 1 is 'cat' in A, 'cow' in B"
    )
    assert (
        class_list_difference(["dog"], None, sources=AB, counts=(None, 1), unnamed_matches=False)
        == "only A names its classes"
    )


def test_check_raises_with_message_difference_and_advice() -> None:
    check_same_classes(["dog"], ["dog"], sources=AB, message="never raised")
    with pytest.raises(ValueError) as err:
        check_same_classes(
            ["dog", "cat"], ["cat", "dog"], sources=AB, message="A and B differ", advice="fix A"
        )
    assert str(err.value) == "A and B differ (class 0 is 'dog' in A, 'cat' in B); fix A"


def _labeled_store(url: str, class_names: list[str]) -> AudioStore:
    clips = [("a", np.zeros(1600, np.float32), [0]), ("b", np.zeros(800, np.float32), [1])]
    return write_audio_store(url, clips, class_names=class_names)


def test_stores_read_as_one_with_reordered_classes_are_refused_naming_the_class(tmp_path: Path) -> None:
    first = _labeled_store(tmp_path / "first.zarr", ["dog", "cat"])
    second = _labeled_store(tmp_path / "second.zarr", ["cat", "dog"])
    with pytest.raises(
        ValueError,
        match=r"first.zarr has another class list than .*second.zarr \(class 0 is 'dog' in .*first.zarr, "
        r"'cat' in .*second",
    ):
        ConcatAudioStore([second, first])
