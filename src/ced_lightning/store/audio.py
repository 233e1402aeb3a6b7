"""The audio store: every clip of a data set as one flat int16 Zarr v3 array, plus per-clip metadata.

Layout (a Zarr v3 group; `docs/` describes it for users):

- attrs: `format_version`, `kind` ("ced-audio-store"), `sample_rate`, `source`, `config`, `fingerprint`,
  `num_clips`, `num_samples`, `num_classes`, `has_labels`, `chunk_samples`, `shard_chunks`,
  `all_chunks_written`, `num_failures`, `complete`, and while writing, `progress` (the last committed shard,
  for resuming).
- `audio` int16 [total samples]: every clip back to back, uncompressed by default, in chunks of 160 s
  (16 AudioSet clips) and shards of 4 chunks (20 MB objects: a store of 2 M clips is ~31 k objects). A clip
  that would cross a chunk boundary starts at the next chunk instead (zero gap; at most one clip's length
  per chunk, none for AudioSet's 10 s clips), so every clip lies in exactly one chunk: a random read touches
  one chunk, and the training stream reads whole chunks (`chunk_spans`). Uncompressed stores are read
  straight from their shard files (`store.shards`), compressed ones through zarr.
- `offsets`, `lengths` int64 [N]; `names` str [N]; labels in CSR form: `label_indptr` int64 [N+1] and
  `label_indices` int32; `class_names`, `class_mids` str [C] when the store has a class list; `failures`
  str [num_failures]: the inputs skipped at prepare time, one JSON record (name, path, kind, reason) each.

`AudioStoreWriter` (`ced_lightning.store.audio_writer`) writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zarr

from ced_lightning.core.audio import int16_to_float
from ced_lightning.core.errors import InputError, MissingInputError
from ced_lightning.store.audio_layout import ARRAYS, WHAT, layout_error, layout_problem, written_arrays
from ced_lightning.store.integrity import (
    StoreDamagedError,
    missing_message,
    missing_objects,
    open_strict_group,
    read_checked,
    zarr_store,
)
from ced_lightning.store.shards import RawShardReader

FORMAT_VERSION = 1
STORE_KIND = "ced-audio-store"


# "No group here" across zarr 3.x releases (names checked so that a renamed class cannot break the import).
_NOT_FOUND: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    *(
        getattr(zarr.errors, name)
        for name in ("GroupNotFoundError", "NodeTypeValidationError", "NodeNotFoundError")
        if isinstance(getattr(zarr.errors, name, None), type)
    ),
)


def _normalize_url(url: str | os.PathLike) -> str:
    return os.fspath(url).rstrip("/") or "/"


def _open_group(url: str, mode: str) -> zarr.Group:
    return zarr.open_group(store=zarr_store(url, read_only=mode == "r"), mode=mode)


def _open_strict(url: str) -> tuple[zarr.Group, set[str]]:
    """The group read through the store's record of written chunks, and the set of array names that
    `AudioStore` fills from that record (`audio_layout.written_arrays`) before it reads a chunk."""
    strict: set[str] = set()
    return open_strict_group(url, "r", lambda array, key: array in strict, WHAT), strict


def _fingerprint(names: Sequence[str], lengths: np.ndarray) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode("utf-8"))
        digest.update(b"\0")
    digest.update(np.ascontiguousarray(lengths, dtype="<i8").tobytes())
    return digest.hexdigest()[:16]


def _failure_record(text: str, keep_item: bool = False) -> dict:
    """One entry of the `failures` array; `_item` (the input's position, for resuming) is the writer's."""
    record = json.loads(str(text))
    if not keep_item:
        record.pop("_item", None)
    return record


class AudioStore:
    """Read side of the audio store. Cheap to pickle: worker processes reopen the Zarr arrays lazily."""

    def __init__(self, url: str, group: zarr.Group, strict: set[str] | None = None) -> None:
        self.url = url
        attrs = dict(group.attrs)
        if attrs.get("kind") != STORE_KIND:
            raise MissingInputError(f"{url}: not an audio store (no kind={STORE_KIND!r} in its attributes)")
        if int(attrs.get("format_version", -1)) > FORMAT_VERSION:
            raise InputError(
                f"{url}: audio store format {attrs['format_version']} is newer than this ced_lightning "
                f"reads ({FORMAT_VERSION}); upgrade ced_lightning"
            )
        if not attrs.get("complete"):
            raise MissingInputError(
                f"{url}: the audio store is incomplete (its writer stopped before the end); rerun the same "
                "`python -m ced_lightning.prepare ...` command to resume it"
            )
        self.attrs: dict[str, Any] = attrs
        self.sample_rate = int(attrs["sample_rate"])
        self.chunk_samples = int(attrs["chunk_samples"])
        self.fingerprint: str = attrs["fingerprint"]
        self.has_labels = bool(attrs.get("has_labels"))
        if strict is None:  # a group opened elsewhere (the writer's): reopened to read it through the record
            group, strict = _open_strict(url)
        arrays = {name: group[name] for name in ARRAYS}
        arrays.update({name: group[name] for name in ("class_names", "class_mids") if name in group})
        # Filled before any chunk is read: from here on a missing object of these arrays is an error.
        strict.update(written_arrays(attrs, arrays))
        self._strict = frozenset(strict)

        def read(name: str) -> np.ndarray:
            return np.asarray(read_checked(arrays[name], slice(None), url, name, WHAT))

        self.names: list[str] = [str(n) for n in read("names")]
        self.lengths: np.ndarray = read("lengths").astype(np.int64)
        self.offsets: np.ndarray = read("offsets").astype(np.int64)
        self._ends = self.offsets + self.lengths
        self._label_indptr: np.ndarray = read("label_indptr").astype(np.int64)
        self._label_indices: np.ndarray = read("label_indices").astype(np.int64)
        self.class_names: list[str] | None = (
            [str(n) for n in read("class_names")] if "class_names" in arrays else None
        )
        self.class_mids: list[str] | None = (
            [str(n) for n in read("class_mids")] if "class_mids" in arrays else None
        )
        self.num_classes: int | None = attrs.get("num_classes")
        problem = layout_problem(
            attrs,
            self.names,
            self.lengths,
            self.offsets,
            self._label_indptr,
            self._label_indices,
            int(arrays["audio"].shape[0]),
        )
        if problem:
            raise layout_error(url, arrays, problem)
        if "audio" in self._strict:
            # Its samples are read later (in data loader workers): its objects are listed now, once.
            missing = missing_objects(url, "audio", arrays["audio"])
            if missing:
                raise StoreDamagedError(
                    missing_message(url, "audio", missing[0], WHAT), url, "audio", missing[0]
                )
        self._label_matrix: np.ndarray | None = None
        self._failures: list[dict] | None = None
        self._audio: zarr.Array | None = None
        self._raw: RawShardReader | None = None
        self._pid: int | None = None  # the process the two handles above belong to
        self._open_handles(arrays["audio"])

    @classmethod
    def open(cls, url: str | os.PathLike) -> AudioStore:
        """Open a complete audio store at a local path or fsspec URL."""
        url = _normalize_url(url)
        try:
            group, strict = _open_strict(url)
        except _NOT_FOUND as err:
            raise MissingInputError(
                f"{url}: no audio store there. Build one with: python -m ced_lightning.prepare "
                f"input=<audio dir, file list or AudioSet CSV> output={url}"
            ) from err
        return cls(url, group, strict)

    # Pickling: worker processes get the numpy metadata and reopen the audio array on first read.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_audio"] = state["_raw"] = state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _group(self) -> zarr.Group:
        """The store's group, read through its record of written chunks (`store.integrity`)."""
        strict = self._strict
        return open_strict_group(self.url, "r", lambda array, key: array in strict, WHAT)

    def _open_handles(self, audio: zarr.Array | None = None) -> None:
        """Open the zarr array and the direct reader for this process (a forked worker opens its own)."""
        self._audio = audio if audio is not None else self._group()["audio"]
        # None for layouts the direct reader does not read (compressed stores): those go through zarr.
        self._raw = RawShardReader.for_array(
            self._audio, self.url, all_chunks_written="audio" in self._strict, what=WHAT
        )
        self._pid = os.getpid()

    @property
    def audio(self) -> zarr.Array:
        """The flat int16 array, opened once per process."""
        if self._pid != os.getpid():
            self._open_handles()
        return self._audio

    def samples(self, start: int, stop: int) -> np.ndarray:
        """int16 samples `[start, stop)` of the flat audio array.

        Uncompressed stores (the default) are read straight from their shard files (`store.shards`), ~10x
        faster than through zarr; compressed ones go through zarr.
        """
        audio = self.audio
        if self._raw is not None:
            return self._raw.read(start, stop)
        return np.asarray(read_checked(audio, slice(start, stop), self.url, "audio", WHAT), dtype=np.int16)

    def __len__(self) -> int:
        return len(self.lengths)

    def __repr__(self) -> str:
        hours = float(self.lengths.sum()) / self.sample_rate / 3600
        return f"AudioStore({self.url!r}, clips={len(self)}, hours={hours:.2f}, classes={self.num_classes})"

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.url}: clip index {i} out of range for {n} clips")
        return i % n

    def read(self, i: int) -> torch.Tensor:
        """Clip `i` as float32 `[samples]` in [-1, 1)."""
        return int16_to_float(torch.from_numpy(self.read_samples(i)))

    def read_samples(self, i: int) -> np.ndarray:
        """Clip `i` as stored: int16 `[samples]`."""
        i = self._check_index(int(i))
        return self.samples(int(self.offsets[i]), int(self._ends[i]))

    def chunk_spans(self) -> np.ndarray:
        """Clip index boundaries `[0, ..., N]` of the groups of clips that share a chunk (what one fast read
        gets); clips longer than a chunk form groups of their own."""
        chunk_of = self.offsets // self.chunk_samples
        starts = np.flatnonzero(np.diff(chunk_of)) + 1
        return np.concatenate([[0], starts, [len(self)]]).astype(np.int64)

    def read_span(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Clips `[start, stop)` in one flat read: (int16 samples, int64 offsets into them [stop-start+1])."""
        n = len(self)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"{self.url}: span [{start}, {stop}) out of range for {n} clips")
        if start == stop:
            return np.zeros(0, dtype=np.int16), np.zeros(1, dtype=np.int64)
        first, last = int(self.offsets[start]), int(self._ends[stop - 1])
        flat = self.samples(first, last)
        lengths = self.lengths[start:stop]
        rel = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if rel[-1] != len(flat):
            # The span crosses a chunk boundary with a gap before it: close the gap (one copy; `read_clips`
            # makes none).
            flat = np.concatenate(self._slice_clips(flat, first, start, stop))
        return flat, rel

    def read_clips(self, start: int, stop: int, max_samples: int | None = None) -> list[np.ndarray]:
        """Clips `[start, stop)` as int16 arrays, from one read and without copying (views into it).

        With `max_samples`, each clip's first `max_samples` only; where long recordings make the span much
        longer than that, each clip's head is read on its own instead of everything in one read.
        """
        n = len(self)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"{self.url}: span [{start}, {stop}) out of range for {n} clips")
        if start == stop:
            return []
        first, last = int(self.offsets[start]), int(self._ends[stop - 1])
        if max_samples is not None:
            heads = np.minimum(self.lengths[start:stop], max_samples)
            if last - first > 2 * int(heads.sum()) + self.chunk_samples:
                offsets = self.offsets[start:stop]
                return [self.samples(int(o), int(o) + int(h)) for o, h in zip(offsets, heads, strict=True)]
        clips = self._slice_clips(self.samples(first, last), first, start, stop)
        return clips if max_samples is None else [clip[:max_samples] for clip in clips]

    def read_clip_range(self, i: int, begin: int, end: int) -> np.ndarray:
        """Samples `[begin, end)` of clip `i` (int16, one read): the later segments of a long recording."""
        i = self._check_index(int(i))
        if not 0 <= begin <= end <= int(self.lengths[i]):
            raise IndexError(
                f"{self.url}: samples [{begin}, {end}) out of range for clip {i} of {int(self.lengths[i])}"
            )
        offset = int(self.offsets[i])
        return self.samples(offset + begin, offset + end)

    def _slice_clips(self, flat: np.ndarray, first: int, start: int, stop: int) -> list[np.ndarray]:
        return [
            flat[int(a) - first : int(b) - first]
            for a, b in zip(self.offsets[start:stop], self._ends[start:stop])
        ]

    def labels(self, i: int) -> np.ndarray:
        """Class indices of clip `i` (int64; empty when it has none)."""
        i = self._check_index(int(i))
        return self._label_indices[self._label_indptr[i] : self._label_indptr[i + 1]]

    def label_counts(self) -> np.ndarray:
        """Labels per clip, int64 `[N]` (0 for a clip without)."""
        return np.diff(self._label_indptr)

    def label_matrix(self) -> np.ndarray:
        """Multi-hot uint8 `[N, num_classes]` (built once)."""
        if self._label_matrix is None:
            if not self.num_classes:
                raise InputError(f"{self.url}: the store has no class list, so no label matrix")
            matrix = np.zeros((len(self), self.num_classes), dtype=np.uint8)
            rows = np.repeat(np.arange(len(self)), np.diff(self._label_indptr))
            matrix[rows, self._label_indices] = 1
            self._label_matrix = matrix
        return self._label_matrix

    def failures(self) -> list[dict]:
        """Inputs skipped when the store was written, each `{"name" or "path": ..., "reason": ...}`."""
        if isinstance(self.attrs.get("failures"), list):  # stores written before the `failures` array
            return list(self.attrs["failures"])
        if self._failures is None:  # read once: the store no longer changes
            count = int(self.attrs.get("num_failures") or 0)
            texts = (
                read_checked(self._group()["failures"], slice(0, count), self.url, "failures", WHAT)
                if count
                else []
            )
            self._failures = [_failure_record(text) for text in texts]
        return list(self._failures)
