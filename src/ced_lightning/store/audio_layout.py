"""What an audio store records as written, and the rules its per-clip metadata obeys.

`AudioStore` checks both when it opens a store and `ced_lightning.check` when it scans one: a chunk that the
record says was written must be there (`written_arrays`), and the metadata must describe a layout the writer
can produce (`layout_problem`): this also catches, in stores written before the record, a lost chunk whose
fill values contradict the rest (zeros in `lengths`, offsets that go back, label pointers that decrease).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr

from ced_lightning.store.integrity import (
    REMEDY,
    StoreDamagedError,
    missing_message,
    missing_objects,
    object_count,
)
from ced_lightning.store.remote import redact_url

WHAT = "audio store"
# The arrays every audio store has (`class_names`, `class_mids` and `failures` are optional).
ARRAYS = ("audio", "lengths", "offsets", "names", "label_indptr", "label_indices")
# Arrays whose chunks can never hold only the fill value (clips are never empty nor unnamed, class lists come
# whole), so that every store, also one written before `chunks_written`, has each of their objects.
_NEVER_FILL_ONLY = ("lengths", "names", "class_names", "class_mids")


def written_arrays(attrs: Mapping[str, Any], arrays: Mapping[str, zarr.Array]) -> set[str]:
    """Names of the arrays in `arrays` whose every chunk object the store must have.

    Those whose `chunks_written` count (the record `AudioStoreWriter.finish` leaves) is the count their shape
    implies; then, for stores without it, the arrays no writer skipped a chunk of: `_NEVER_FILL_ONLY`,
    `offsets` of more than one clip (one clip's offsets are `[0]`, the fill value), and `audio` where
    `all_chunks_written` says the writer stored silence too.
    """
    counts = attrs.get("chunks_written")
    written = set()
    if isinstance(counts, Mapping):
        written = {n for n, count in counts.items() if n in arrays and int(count) == object_count(arrays[n])}
    written.update(n for n in _NEVER_FILL_ONLY if n in arrays)
    if int(attrs.get("num_clips") or 0) > 1:
        written.add("offsets")
    if attrs.get("all_chunks_written"):
        written.add("audio")
    return written


def layout_problem(
    attrs: Mapping[str, Any],
    names: list[str],
    lengths: np.ndarray,
    offsets: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    audio_samples: int,
) -> tuple[str, str] | None:
    """(array, what is wrong) for the first rule the metadata breaks; None when it describes a store the
    writer can produce. Linear in the clips and labels (numpy), far cheaper than reading them."""
    n = int(attrs.get("num_clips", len(names)))
    for name, size, want in (
        ("names", len(names), n),
        ("lengths", len(lengths), n),
        ("offsets", len(offsets), n),
        ("label_indptr", len(indptr), n + 1),
    ):
        if size != want:
            return name, f"{size} entries for {n} clips (num_clips)"
    if n and int(lengths.min()) <= 0:
        return "lengths", f"clip {int(np.argmin(lengths))} has {int(lengths.min())} samples"
    if "num_samples" in attrs and int(lengths.sum()) != int(attrs["num_samples"]):
        return (
            "lengths",
            f"the clips add up to {int(lengths.sum())} samples, num_samples is {attrs['num_samples']}",
        )
    if "" in names:
        return "names", f"clip {names.index('')} has an empty name"
    if n and int(offsets[0]) < 0:
        return "offsets", f"clip 0 starts at sample {int(offsets[0])}"
    overlaps = np.flatnonzero(np.diff(offsets) < lengths[:-1])
    if len(overlaps):
        return "offsets", f"clip {int(overlaps[0]) + 1} starts inside the clip before it"
    if n and int(offsets[-1] + lengths[-1]) > audio_samples:
        return "offsets", f"the last clip ends past the {audio_samples} samples of 'audio'"
    if int(indptr[0]) != 0 or (np.diff(indptr) < 0).any() or int(indptr[-1]) != len(indices):
        return "label_indptr", f"the label pointers do not run from 0 up to the {len(indices)} labels"
    num_classes = attrs.get("num_classes")
    if (
        len(indices)
        and num_classes
        and not (int(indices.min()) >= 0 and int(indices.max()) < int(num_classes))
    ):
        return "label_indices", f"class indices outside 0..{int(num_classes) - 1}"
    # Each clip's labels are stored sorted and unique: a repeat inside a clip is a lost chunk's zeros.
    within = np.ones(len(indices), dtype=bool)
    within[indptr[:-1][np.diff(indptr) > 0]] = False  # each clip's first label
    repeat = np.flatnonzero(within[1:] & (np.diff(indices) <= 0)) if len(indices) > 1 else np.zeros(0, int)
    if len(repeat):
        return "label_indices", f"label {int(repeat[0]) + 1} repeats or goes back within its clip"
    return None


def layout_error(url: str, arrays: Mapping[str, zarr.Array], problem: tuple[str, str]) -> StoreDamagedError:
    """The error for a broken rule: naming the lost chunk of that array when one is missing (a store written
    before `chunks_written`), else the rule."""
    name, what = problem
    missing = missing_objects(url, name, arrays[name])
    if missing:
        why = f"and read as fill values the metadata breaks a rule ({what})"
        return StoreDamagedError(missing_message(url, name, missing[0], WHAT, why), url, name, missing[0])
    return StoreDamagedError(
        f"{WHAT} {redact_url(url)} is damaged: array {name!r}: {what}. {REMEDY}",
        url,
        name,
    )
