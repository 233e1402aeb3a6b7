"""Segments: the rows of a logit store, each a fixed-length piece of one clip of the audio store.

The original CED splits every recording into 10 s chunks and teaches on each; extraction and distillation do
the same here. The rule (`segment_table`), for a clip of `L` samples and segments of `S`:

- a clip not longer than one segment (`L <= S`) is one segment at 0 (zero-padded to the input width later);
- a longer clip gives its `L // S` whole segments at 0, S, 2S, ..., and its last partial segment when that
  holds at least half a segment (`L % S >= S / 2`); a shorter rest is left out.

Row `r` then reads `min(S, L - start)` samples of clip `clip[r]` from `start[r]`, or fewer where the table
gives the row a `length` of its own (an imported release: the span the teachers heard). A logit store without
position arrays (every store written before segments, and every store whose clips all fit one segment with
`S` = its clip length) has one row per clip at 0: `SegmentTable.one_per_clip`.

Reads go through the audio store's `read_clips` (a run of neighbouring clips read from their starts, as
before segments) and `read_clip_range` (one read of a clip's samples `[begin, end)` for its later segments),
so any store view with those two methods serves segments too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ced_lightning.core.errors import ConfigError


class SegmentReadable(Protocol):
    """What segment reads need of an audio store (or a view over several)."""

    lengths: np.ndarray

    def read_clips(self, start: int, stop: int, max_samples: int | None = None) -> list[np.ndarray]: ...

    def read_clip_range(self, i: int, begin: int, end: int) -> np.ndarray: ...


@dataclass(frozen=True)
class SegmentTable:
    """Row -> (clip index, start sample); rows sorted by clip, then start."""

    clip: np.ndarray  # int32 [S]
    start: np.ndarray  # int64 [S]
    segment_samples: int
    # int64 [S]: the most samples each row reads (None: segment_samples each)
    length: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.clip.shape != self.start.shape or self.clip.ndim != 1:
            raise ValueError(f"segment clip {self.clip.shape} and start {self.start.shape} must be equal 1-D")
        if self.length is not None and (self.length.shape != self.clip.shape or (self.length < 1).any()):
            raise ValueError(
                f"segment lengths {self.length.shape} must be >= 1, one per row {self.clip.shape}"
            )
        if self.segment_samples < 1:
            raise ConfigError(f"segment length must be >= 1 sample, got {self.segment_samples}")

    def __len__(self) -> int:
        return len(self.clip)

    @classmethod
    def one_per_clip(cls, num_clips: int, segment_samples: int) -> SegmentTable:
        """Every clip one segment at 0: the layout of stores without position arrays."""
        return cls(
            np.arange(num_clips, dtype=np.int32), np.zeros(num_clips, dtype=np.int64), int(segment_samples)
        )

    def is_one_per_clip(self, num_clips: int) -> bool:
        return (
            self.length is None
            and len(self) == num_clips
            and bool((self.start == 0).all())
            and np.array_equal(self.clip, np.arange(num_clips))
        )

    def lengths(self, clip_lengths: np.ndarray) -> np.ndarray:
        """Samples each row reads: the segment (or the row's length), cut at its clip's end (int64 `[S]`)."""
        rest = np.asarray(clip_lengths, dtype=np.int64)[self.clip] - self.start
        cap = self.segment_samples if self.length is None else np.minimum(self.length, self.segment_samples)
        return np.clip(rest, 0, cap)

    def row_bounds(self, clip_bounds: np.ndarray, piece_rows: int = 16) -> np.ndarray:
        """Clip group boundaries `[0, ..., N]` (e.g. `AudioStore.chunk_spans`) as row boundaries, with the
        rows of a clip of several segments cut into pieces of `piece_rows` (a long recording is a training
        span of its own; in one piece, its hundreds of segments would fill whole shuffle windows).
        Clips of one segment each keep the groups exactly."""
        bounds = [np.searchsorted(self.clip, np.asarray(clip_bounds), side="left")]
        first = np.flatnonzero(np.diff(self.clip, prepend=-1))  # each clip's first row
        counts = np.diff(np.append(first, len(self)))
        for f, c in zip(first[counts > 1], counts[counts > 1], strict=True):
            bounds.append(np.arange(f, f + c + 1, piece_rows))
            bounds.append(np.array([f + c]))
        return np.unique(np.concatenate(bounds)).astype(np.int64)

    def num_clips_in(self, rows: np.ndarray) -> int:
        """How many distinct clips the rows `rows` cover."""
        return len(np.unique(self.clip[np.asarray(rows, dtype=np.int64)]))


def segment_counts(lengths: np.ndarray, segment_samples: int) -> np.ndarray:
    """Segments per clip under the rule (module docstring): int64 `[N]`, at least 1 each."""
    if segment_samples < 1:
        raise ConfigError(f"segment length must be >= 1 sample, got {segment_samples}")
    lengths = np.asarray(lengths, dtype=np.int64)
    whole, rest = np.divmod(lengths, segment_samples)
    # `2 * rest >= S`: the last partial segment holds at least half a segment (exact for odd S too).
    return np.maximum(whole + (2 * rest >= segment_samples), 1)


def segment_table(lengths: np.ndarray, segment_samples: int) -> SegmentTable:
    """Every segment of every clip (clip lengths in samples, e.g. the audio store's `lengths`)."""
    counts = segment_counts(lengths, segment_samples)
    clip = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    first_row = np.cumsum(counts) - counts  # each clip's first row
    ordinal = np.arange(len(clip), dtype=np.int64) - np.repeat(first_row, counts)
    return SegmentTable(clip, ordinal * int(segment_samples), int(segment_samples))


def read_segments(audio: SegmentReadable, table: SegmentTable, rows: np.ndarray) -> dict[int, np.ndarray]:
    """The samples of rows `rows` (row -> int16 array of `table.lengths` samples), few reads.

    Runs of neighbouring clips read as one segment each at 0 (every store without position arrays: the
    exact reads of before) go through `read_clips(start, stop, max_samples=S)`; the rows of a clip with more
    than one segment in `rows` come from one `read_clip_range` over them.
    """
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    out: dict[int, np.ndarray] = {}
    if len(rows) == 0:
        return out
    seg = table.segment_samples
    clips, starts = table.clip[rows].astype(np.int64), table.start[rows]
    row_len = table.lengths(audio.lengths)[rows]
    # Groups of rows of one clip (rows are sorted by clip, then start).
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(clips)) + 1, [len(rows)]])
    heads: list[int] = []  # positions in `rows` of lone segments at 0, read in runs of neighbouring clips

    def flush_heads() -> None:
        if not heads:
            return
        for run in np.split(np.asarray(heads), np.flatnonzero(np.diff(clips[heads]) != 1) + 1):
            first, last = int(clips[run[0]]), int(clips[run[-1]])
            for pos, samples in zip(run, audio.read_clips(first, last + 1, max_samples=seg), strict=True):
                out[int(rows[pos])] = samples[: int(row_len[pos])]
        heads.clear()

    for a, b in itertools.pairwise(bounds):
        if b - a == 1 and starts[a] == 0:
            heads.append(int(a))
            continue
        flush_heads()
        begin, end = int(starts[a]), int((starts[a:b] + row_len[a:b]).max())
        flat = audio.read_clip_range(int(clips[a]), begin, end)
        for pos in range(a, b):
            offset = int(starts[pos]) - begin
            out[int(rows[pos])] = flat[offset : offset + int(row_len[pos])]
    flush_heads()
    return out
