"""Reading the original CED's released teacher logits (`logits/<ensemble>/<subset>/chunk_10/`).

Per stored augmentation epoch e (1-based) and extraction rank r, `logits_ep{e}_{r}.h5` holds `topk_values`
float16 `[n, k]` (probabilities, descending), `topk_indexes` int16 `[n, k]` and `seeds` int32 `[n]`, and
`logits_ep{e}_{r}.parquet` the columns `filename` (AudioSet file basename), `start`, `end` (float32 seconds):
row i of the parquet describes row i of the h5 file.

`plan_import` matches every row to a clip of an audio store and says which file and row each (epoch, store
row) comes from, a store row being a span of a clip as the original reads it (`ImportPlan`);
`read_block_rows` then reads those rows for a block of store rows. Pure reading and checking:
`release.importer` writes the logit store.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from ced_lightning.core.audio import AUDIO_EXTENSIONS, SAMPLE_RATE
from ced_lightning.core.errors import CedError, MissingDependencyError, MissingInputError
from ced_lightning.data.sources import segment_ytid
from ced_lightning.store.remote import redact_url
from ced_lightning.store.segments import SegmentTable

_FILE_NAME = re.compile(r"ep(\d+)_(\d+)\.h5$")
_EXAMPLES = 5
# float32 seconds of the parquet: a span "of 10 s" may read 10.000001.
_SECONDS_SLACK = 1e-4
_VALIDATE_ROWS = 1 << 16


def require_import_extra() -> tuple[Any, Any]:
    """(h5py, pyarrow.parquet), or an ImportError naming the extra that installs them."""
    try:
        import h5py
        import pyarrow.parquet as parquet
    except ImportError as err:
        raise MissingDependencyError(
            f"importing the original CED logits needs h5py and pyarrow ({err}). Install them with: "
            "pip install 'ced-lightning[import]'"
        ) from err
    return h5py, parquet


@dataclass(frozen=True)
class LegacyFile:
    """One rank's output for one stored epoch: the h5 file and its parquet index, by path or fsspec URL."""

    epoch: int  # as stored, 1-based
    rank: int
    h5: str
    parquet: str

    @property
    def name(self) -> str:
        return self.h5.rstrip("/").rsplit("/", 1)[-1]


def find_legacy_files(source: str) -> list[LegacyFile]:
    """Every `logits_ep{e}_{r}.h5` with its `.parquet` under `source`, by (epoch, rank).

    Refuses a folder without such files, an h5 file without its parquet, and stored epochs that are not
    1..E without gaps (the original reader would fail on a missing one).
    """
    fs, root = fsspec.core.url_to_fs(str(source))
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise MissingInputError(f"source={source}: not a folder (the released chunk_10/ folder of logits)")
    full = (lambda p: p) if _is_local(fs) else fs.unstrip_protocol
    names = sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    files: list[LegacyFile] = []
    for name in names:
        match = _FILE_NAME.search(name)
        if match is None:
            continue
        parquet = name[: -len(".h5")] + ".parquet"
        if parquet not in names:
            raise MissingInputError(
                f"source={source}: {name} has no {parquet} beside it (its rows' file names); copy it from "
                "the same release"
            )
        epoch, rank = int(match.group(1)), int(match.group(2))
        files.append(LegacyFile(epoch, rank, full(f"{root}/{name}"), full(f"{root}/{parquet}")))
    if not files:
        raise MissingInputError(
            f"source={source}: no logits_ep<epoch>_<rank>.h5 files; give the folder that holds them "
            "(e.g. logits/ensemble5014/balanced/chunk_10)"
        )
    epochs = sorted({f.epoch for f in files})
    expected = list(range(1, epochs[-1] + 1))
    if epochs != expected:
        missing = sorted(set(expected) - set(epochs))
        raise MissingInputError(
            f"source={source}: stored epochs {epochs}, missing epoch(s) {missing} of 1..{epochs[-1]}; "
            "copy the whole chunk_10 folder"
        )
    return sorted(files, key=lambda f: (f.epoch, f.rank))


def file_provenance(files: Sequence[LegacyFile]) -> list[dict[str, Any]]:
    """Name, size and sha256 of every source file (h5 and parquet), in a fixed order."""
    out = []
    for f in files:
        for url in (f.h5, f.parquet):
            fs, path = fsspec.core.url_to_fs(url)
            digest = hashlib.sha256()
            with fs.open(path, "rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
            out.append(
                {"name": path.rsplit("/", 1)[-1], "bytes": int(fs.size(path)), "sha256": digest.hexdigest()}
            )
    return out


def source_digest(provenance: Sequence[dict[str, Any]]) -> str:
    """One sha256 over the source files' names and hashes: the imported 'teacher's identity."""
    digest = hashlib.sha256()
    for record in provenance:
        digest.update(f"{record['name']}\0{record['sha256']}\n".encode())
    return digest.hexdigest()


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _open_h5(url: str) -> Any:
    h5py, _ = require_import_extra()
    fs, path = fsspec.core.url_to_fs(url)
    return h5py.File(path if _is_local(fs) else fs.open(path, "rb"), "r")


@contextmanager
def _reading(url: str, f: LegacyFile, rows: str = "") -> Iterator[None]:
    """A released file that cannot be read (truncated, damaged, not HDF5 or Parquet) as one
    LegacyImportError naming it and what it holds: h5py's and pyarrow's own errors name no file."""
    try:
        yield
    except LegacyImportError:
        raise
    except (OSError, ValueError) as err:
        held = f"epoch {f.epoch}, rank {f.rank}{f', {rows}' if rows else ''}"
        reason = (str(err).strip().splitlines() or [""])[0]
        raise LegacyImportError(
            f"{redact_url(url)} ({held}): cannot read it ({type(err).__name__}: {reason}); the file is "
            "damaged or truncated: copy it again from the release"
        ) from err


def _stem(filename: str) -> str:
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    head, dot, ext = base.rpartition(".")
    return head if dot and f".{ext.lower()}" in AUDIO_EXTENSIONS else base


class ClipMatcher:
    """Finds the audio-store clip of a released row's `filename`, in any naming convention `prepare` accepts.

    First the exact file stem (a store prepared from a folder of the same files), then the YouTube id that
    `segment_ytid` reads from both names (a store prepared from the segment CSVs is named by YTID; another
    download may name files `Y<id>.wav`, `<id>_30.000.wav`, ...). Two store clips with one YTID match by
    exact stem only.
    """

    def __init__(self, clip_names: Sequence[str]) -> None:
        self._exact: dict[str, int] = {}
        self._ytid: dict[str, int] = {}
        ambiguous: set[str] = set()
        for i, name in enumerate(clip_names):
            stem = _stem(str(name))
            self._exact.setdefault(stem, i)
            ytid = segment_ytid(stem)
            if ytid is not None:
                if ytid in self._ytid:
                    ambiguous.add(ytid)
                self._ytid.setdefault(ytid, i)
        for ytid in ambiguous:
            del self._ytid[ytid]

    def __call__(self, filename: str) -> int:
        """The clip's index in the audio store, or -1."""
        stem = _stem(filename)
        if stem in self._exact:
            return self._exact[stem]
        ytid = segment_ytid(stem)
        return self._ytid.get(ytid, -1) if ytid is not None else -1


@dataclass
class ImportPlan:
    """Where every (epoch, row) of the logit store comes from, and what did not fit.

    The store's rows are the released spans the original trained on: every clip of the audio store's span
    from 0 s, and the spans the release holds beyond those: a later piece of a longer clip (a row starting
    after 0 s) and a clip's second row over the same span in one epoch (the original trains on each).
    `clip_of`, `start_of` give each row's clip and first sample; without such spans row i is clip i, the
    layout of a store without segments.
    """

    files: list[LegacyFile]
    epochs: int
    topk: int
    # [E, R]: index into `files` (-1: no row) and row within that file
    file_of: np.ndarray
    row_of: np.ndarray
    # [E, R]: the span the original read, `round(end·sr) - round(start·sr)` samples
    span_samples: np.ndarray
    # [R]: each store row's clip and first sample (rows sorted by clip, then start)
    clip_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    start_of: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rows: int = 0
    matched_rows: int = 0
    unmatched_rows: int = 0
    unmatched_examples: list[str] = field(default_factory=list)
    # clips with no row in any stored epoch, and clips with a row missing from some epochs
    clips_without_rows: list[int] = field(default_factory=list)
    clips_with_some_epochs: list[int] = field(default_factory=list)
    # released rows the store holds as the original reads them (counted, with examples)
    late_rows: list[str] = field(default_factory=list)  # starting after 0 s: a later piece of the clip
    long_rows: list[str] = field(default_factory=list)  # spanning more than the teachers' input
    repeated_rows: list[str] = field(default_factory=list)  # a clip's span a second time in one epoch

    def ranks_per_epoch(self) -> dict[int, int]:
        counts: dict[int, int] = defaultdict(int)
        for f in self.files:
            counts[f.epoch] += 1
        return dict(sorted(counts.items()))

    def segment_table(self, clip_lengths: np.ndarray, segment_samples: int) -> SegmentTable:
        """The store's rows as segments: each reads its released span (the longest over the stored epochs)
        and no more, so a clip longer than the span is cut to what the teachers heard. One row per clip at
        0, none cut, is the layout of a store without positions."""
        present = self.file_of >= 0
        span = np.where(present, self.span_samples, 0).max(0).astype(np.int64)
        length = np.where(present.any(0), span, segment_samples)
        rest = np.asarray(clip_lengths, dtype=np.int64)[self.clip_of] - self.start_of
        cut = length < np.minimum(rest, segment_samples)
        return SegmentTable(
            self.clip_of.copy(),
            self.start_of.copy(),
            segment_samples,
            np.maximum(length, 1) if cut.any() else None,
        )


class LegacyImportError(CedError, ValueError):
    """The released files cannot be imported as they are (the message names the rows and what to do)."""


def count_with_examples(items: Sequence[str], count: int | None = None) -> str:
    """`N (first; second; ... )`: a count and the first few of what it counts, for messages and reports."""
    count = len(items) if count is None else count
    shown = "; ".join(items[:_EXAMPLES])
    return f"{count} ({shown}{' ...' if count > _EXAMPLES else ''})"


@dataclass
class _ExtraRow:
    """A matched released row beyond its clip's first span from 0 s in its epoch."""

    epoch: int
    file: int
    row: int
    clip: int
    start: int  # samples
    span: int  # samples


def plan_import(files: Sequence[LegacyFile], clip_names: Sequence[str], clip_samples: int) -> ImportPlan:
    """Match every released row to an audio-store clip and lay the rows out as the logit store's rows.

    Refused (LegacyImportError naming the file): parquet and h5 row counts or top-k widths that differ.
    Rows starting after 0 s, rows spanning more than `clip_samples` and a clip's span twice in one epoch are
    kept as the original reads them and listed in the plan (`late_rows`, `long_rows`, `repeated_rows`);
    unmatched rows and clips without rows are counted. The caller decides what to allow.
    """
    _, parquet = require_import_extra()
    files = list(files)
    epochs = max(f.epoch for f in files)
    n = len(clip_names)
    matcher = ClipMatcher(clip_names)
    # The first row of each (epoch, clip) starting at 0 s: the clip's own row, as in a store of clips.
    file_of = np.full((epochs, n), -1, dtype=np.int32)
    row_of = np.full((epochs, n), -1, dtype=np.int32)
    span = np.zeros((epochs, n), dtype=np.int32)
    plan = ImportPlan(files, epochs, 0, file_of, row_of, span)
    extra: list[_ExtraRow] = []
    unmatched = []
    clip_seconds = clip_samples / SAMPLE_RATE
    for k, f in enumerate(files):
        fs, path = fsspec.core.url_to_fs(f.parquet)
        with _reading(f.parquet, f), fs.open(path, "rb") as handle:
            table = parquet.read_table(handle)
        missing = {"filename", "start", "end"} - set(table.column_names)
        if missing:
            raise LegacyImportError(
                f"{f.parquet}: no column(s) {sorted(missing)} (columns: {table.column_names}); expected the "
                "released layout: filename, start, end"
            )
        names = [str(x) for x in table.column("filename").to_pylist()]
        starts = np.asarray(table.column("start").to_numpy(), dtype=np.float64)
        ends = np.asarray(table.column("end").to_numpy(), dtype=np.float64)
        # The samples the original reader cuts, `data[round(start·sr):round(end·sr)]` of the float32 columns.
        first_samples = _samples(starts)
        spans = _samples(ends) - first_samples
        with _reading(f.h5, f), _open_h5(f.h5) as h5:
            shapes = _check_h5(h5, f)
        rows, topk = shapes
        if rows != len(names):
            raise LegacyImportError(
                f"{f.name}: {rows} rows in the h5 file but {len(names)} in {f.parquet}; the pair must come "
                "from the same extraction"
            )
        if plan.topk and topk != plan.topk:
            raise LegacyImportError(f"{f.name}: top-{topk} rows, other files hold top-{plan.topk}")
        plan.topk = topk
        plan.rows += rows
        e = f.epoch - 1
        for row, (name, start, end) in enumerate(zip(names, starts, ends)):
            where = f"{f.name} row {row} {name}"
            clip = matcher(name)
            if clip < 0:
                unmatched.append(where)
                continue
            plan.matched_rows += 1
            if end - start > clip_seconds + _SECONDS_SLACK:
                plan.long_rows.append(f"{where} spans {start:g}-{end:g} s")
            late = start > _SECONDS_SLACK
            if late:
                plan.late_rows.append(f"{where} starts at {start:g} s")
            if late or file_of[e, clip] >= 0:
                extra.append(
                    _ExtraRow(e, k, row, clip, int(first_samples[row]) if late else 0, int(spans[row]))
                )
                continue
            file_of[e, clip], row_of[e, clip] = k, row
            span[e, clip] = spans[row]
    plan.unmatched_rows = len(unmatched)
    plan.unmatched_examples = unmatched[:_EXAMPLES]
    _add_extra_rows(plan, extra, clip_names)
    has_rows = plan.file_of >= 0
    # A row is in some epochs only, or a clip has rows in none: per clip, over all its rows.
    every = np.ones(n, dtype=bool)
    np.logical_and.at(every, plan.clip_of, has_rows.all(0))
    some = np.zeros(n, dtype=bool)
    np.logical_or.at(some, plan.clip_of, has_rows.any(0))
    plan.clips_without_rows = [int(i) for i in np.flatnonzero(~some)]
    plan.clips_with_some_epochs = [int(i) for i in np.flatnonzero(some & ~every)]
    return plan


def _add_extra_rows(plan: ImportPlan, extra: list[_ExtraRow], clip_names: Sequence[str]) -> None:
    """Lay out the store's rows: every clip's row at 0 (rows 0..N-1 while there is nothing else), then one
    row per further (clip, start, k-th time in its epoch) the release holds, sorted by clip and start."""
    num_clips = len(clip_names)
    if not extra:
        plan.clip_of = np.arange(num_clips, dtype=np.int32)
        plan.start_of = np.zeros(num_clips, dtype=np.int64)
        return
    # k-th time a (clip, start) comes in its epoch: the clip's first row at 0 is the 0th of (clip, 0).
    seen: dict[tuple[int, int, int], int] = defaultdict(int)
    keyed = []
    for x in extra:
        key = (x.epoch, x.clip, x.start)
        occurrence = seen[key] + (1 if x.start == 0 else 0)
        seen[key] += 1
        if occurrence:
            where = (
                f"{plan.files[x.file].name} row {x.row} {clip_names[x.clip]} from {x.start / SAMPLE_RATE:g} s"
            )
            plan.repeated_rows.append(where)
        keyed.append((x.clip, x.start, occurrence))
    keys = sorted({(c, 0, 0) for c in range(num_clips)} | set(keyed))
    index = {key: i for i, key in enumerate(keys)}
    base = np.array([index[(c, 0, 0)] for c in range(num_clips)], dtype=np.int64)
    epochs = plan.epochs
    file_of = np.full((epochs, len(keys)), -1, dtype=np.int32)
    row_of = np.full((epochs, len(keys)), -1, dtype=np.int32)
    span = np.zeros((epochs, len(keys)), dtype=np.int32)
    file_of[:, base], row_of[:, base], span[:, base] = plan.file_of, plan.row_of, plan.span_samples
    for x, key in zip(extra, keyed, strict=True):
        r = index[key]
        file_of[x.epoch, r], row_of[x.epoch, r], span[x.epoch, r] = x.file, x.row, x.span
    plan.file_of, plan.row_of, plan.span_samples = file_of, row_of, span
    plan.clip_of = np.array([key[0] for key in keys], dtype=np.int32)
    plan.start_of = np.array([key[1] for key in keys], dtype=np.int64)


def _samples(seconds: np.ndarray) -> np.ndarray:
    return np.rint(seconds.astype(np.float32) * np.float32(SAMPLE_RATE)).astype(np.int64)


def _check_h5(h5: Any, f: LegacyFile) -> tuple[int, int]:
    """(rows, k) of one h5 file, after checking its datasets' names, dtypes and shapes."""
    expected = {"topk_values": np.float16, "topk_indexes": np.int16, "seeds": np.int32}
    for key, dtype in expected.items():
        if key not in h5:
            raise LegacyImportError(
                f"{f.name}: no dataset {key!r} (it has {sorted(h5)}); expected the released layout "
                "topk_values, topk_indexes, seeds"
            )
        if h5[key].dtype != dtype:
            raise LegacyImportError(f"{f.name}: {key} is {h5[key].dtype}, expected {np.dtype(dtype)}")
    values, indexes, seeds = h5["topk_values"], h5["topk_indexes"], h5["seeds"]
    if values.ndim != 2 or indexes.shape != values.shape or seeds.shape != values.shape[:1]:
        raise LegacyImportError(
            f"{f.name}: shapes topk_values {values.shape}, topk_indexes {indexes.shape}, seeds "
            f"{seeds.shape}; expected [n, k], [n, k], [n]"
        )
    return int(values.shape[0]), int(values.shape[1])


def validate_rows(f: LegacyFile, num_classes: int) -> None:
    """Refuse class indices outside 0..num_classes-1, a class twice in a row, and values that are not
    probabilities, naming the file and row."""
    with _reading(f.h5, f), _open_h5(f.h5) as h5:
        values, indexes = h5["topk_values"], h5["topk_indexes"]
        for start in range(0, values.shape[0], _VALIDATE_ROWS):
            stop = min(start + _VALIDATE_ROWS, values.shape[0])
            with _reading(f.h5, f, f"rows {start}..{stop - 1}"):
                idx = np.asarray(indexes[start:stop]).astype(np.int64)
                val = np.asarray(values[start:stop]).astype(np.float32)
            bad = np.flatnonzero(((idx < 0) | (idx >= num_classes)).any(1))
            if bad.size:
                row = int(bad[0])
                raise LegacyImportError(
                    f"{f.name} row {start + row}: class indices {idx[row].tolist()} outside "
                    f"0..{num_classes - 1} ({bad.size} such rows in this part of the file); is "
                    f"num_classes={num_classes} right?"
                )
            ordered = np.sort(idx, axis=1)
            repeated = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(1))
            if repeated.size:
                row = int(repeated[0])
                raise LegacyImportError(f"{f.name} row {start + row}: a class twice in {idx[row].tolist()}")
            bad = np.flatnonzero((~np.isfinite(val) | (val < 0) | (val > 1)).any(1))
            if bad.size:
                row = int(bad[0])
                raise LegacyImportError(
                    f"{f.name} row {start + row}: values {val[row].tolist()} are not probabilities in [0, 1]"
                )


def read_block_rows(plan: ImportPlan, clips: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices int64 [E, n, k], values float16 [E, n, k], seeds int64 [E, n]) of rows `clips` of the store.

    Reads each source file's rows for these store rows in one sorted selection. (epoch, row) pairs without
    a released row (`plan.file_of < 0`) get zeros.
    """
    file_of, row_of = plan.file_of[:, clips], plan.row_of[:, clips]
    epochs, n = file_of.shape
    indices = np.zeros((epochs, n, plan.topk), dtype=np.int64)
    values = np.zeros((epochs, n, plan.topk), dtype=np.float16)
    seeds = np.zeros((epochs, n), dtype=np.int64)
    for k in np.unique(file_of[file_of >= 0]):
        e_pos, c_pos = np.nonzero(file_of == k)
        rows = row_of[e_pos, c_pos]
        order = np.argsort(rows)
        sorted_rows = rows[order]
        source = plan.files[int(k)]
        held = f"rows {sorted_rows[0]}..{sorted_rows[-1]}"
        with _reading(source.h5, source, held), _open_h5(source.h5) as h5:
            # h5py reads a point selection of increasing rows; one per file and block.
            idx = np.asarray(h5["topk_indexes"][sorted_rows])
            val = np.asarray(h5["topk_values"][sorted_rows])
            sd = np.asarray(h5["seeds"][sorted_rows])
        e_sorted, c_sorted = e_pos[order], c_pos[order]
        indices[e_sorted, c_sorted] = idx
        values[e_sorted, c_sorted] = val
        seeds[e_sorted, c_sorted] = sd
    return indices, values, seeds
