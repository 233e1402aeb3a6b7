"""Writing an audio store (`ced_lightning.store.audio` describes its layout and reads it).

The writer is resumable: audio goes to the store in whole shards only, and after each shard the per-clip
metadata of the clips completed so far plus a `progress` attribute are written (the attribute last, so it
is the commit point). A rerun with the same arguments reopens the store, drops anything past the last
commit and carries on from there; the result is the same arrays as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from ced_lightning.core.audio import SAMPLE_RATE, float_to_int16
from ced_lightning.core.errors import ConfigError, InputError, OutputExistsError
from ced_lightning.store.audio import (
    _NOT_FOUND,
    FORMAT_VERSION,
    STORE_KIND,
    AudioStore,
    _failure_record,
    _fingerprint,
    _normalize_url,
    _open_group,
)
from ced_lightning.store.files import check_free_for_store, remove_partial_writes
from ced_lightning.store.integrity import missing_objects, object_count
from ced_lightning.store.lock import store_lock

log = logging.getLogger(__name__)

# One zarr read costs ~0.5 ms per chunk whatever its size (measured, zarr 3.1), so chunks hold many clips:
# 16 AudioSet clips (160 s, 5 MB). Clips never cross a chunk boundary (see the module docstring).
DEFAULT_CHUNK_SAMPLES = 16 * 160_000
# 4 chunks = 20 MB per shard object: few objects on disk or in a bucket, and the writer's buffer stays small.
DEFAULT_SHARD_CHUNKS = 4
# Audio compresses poorly (zstd+shuffle saves ~14% on real audio) and decompression halves read speed.
COMPRESSIONS = ("none", "zstd")
# Per-clip metadata: 8192 entries per chunk keeps the per-shard append (a read-modify-write of the last
# chunk) cheap, and even millions of clips stay a few hundred objects.
_META_CHUNK = 8192
_FAILURES_CHUNK = 1024


def _to_int16(waveform: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().numpy()
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise InputError(f"clip {name!r}: expected a mono waveform [samples], got shape {waveform.shape}")
    if waveform.dtype == np.int16:
        return waveform
    if not np.issubdtype(waveform.dtype, np.floating):
        raise InputError(f"clip {name!r}: expected float32 in [-1, 1] or int16 samples, got {waveform.dtype}")
    return float_to_int16(waveform)


def _resize(arr: zarr.Array, size: int) -> None:
    arr.resize((size,))
    if arr.shape != (size,):  # resize is in place in zarr 3.1; fail loudly should a release change that
        raise RuntimeError(f"zarr did not resize {arr.path} in place (shape {arr.shape}, wanted {size})")


def _job_signature(
    source: str,
    config: dict | None,
    class_names: Sequence[str] | None,
    class_mids: Sequence[str] | None,
    chunk_samples: int,
    shard_chunks: int,
) -> dict[str, Any]:
    # What must match for a rerun to resume (or reuse) a store rather than refuse to touch it.
    return json.loads(
        json.dumps(
            {
                "source": source,
                "config": config or {},
                "class_names": list(class_names) if class_names is not None else None,
                "class_mids": list(class_mids) if class_mids is not None else None,
                "chunk_samples": int(chunk_samples),
                "shard_chunks": int(shard_chunks),
            },
            default=str,
        )
    )


class AudioStoreWriter:
    """Appends clips in order; commits whole shards; resumes from the last commit of an earlier run.

    Every array is created empty and grows by doubling its capacity (a metadata-only resize), because the
    total length is unknown until every file is decoded (resampling changes lengths, files fail); `finish`
    trims each to its exact size. Audio is only ever written in whole, shard-aligned pieces, so no shard is
    rewritten, except the last, partial one at the end.
    """

    def __init__(
        self,
        url: str | os.PathLike,
        *,
        class_names: Sequence[str] | None = None,
        class_mids: Sequence[str] | None = None,
        source: str = "memory",
        config: dict | None = None,
        overwrite: bool = False,
        chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
        shard_chunks: int = DEFAULT_SHARD_CHUNKS,
        sample_rate: int = SAMPLE_RATE,
        compression: str = "none",
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ConfigError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
        self.compression = compression
        if chunk_samples <= 0 or shard_chunks <= 0:
            raise ConfigError(
                f"chunk_samples and shard_chunks must be positive, not {chunk_samples}, {shard_chunks}"
            )
        if class_mids is not None and class_names is not None and len(class_mids) != len(class_names):
            raise ConfigError(
                f"class_mids ({len(class_mids)}) and class_names ({len(class_names)}) differ in length"
            )
        if class_mids is not None and class_names is None:
            class_names = list(class_mids)
        self.url = _normalize_url(url)
        self.class_names = list(class_names) if class_names is not None else None
        self.class_mids = list(class_mids) if class_mids is not None else None
        self.num_classes = len(self.class_names) if self.class_names is not None else None
        self.chunk_samples = int(chunk_samples)
        self.shard_samples = int(chunk_samples) * int(shard_chunks)
        self.sample_rate = int(sample_rate)
        self.signature = _job_signature(
            source, config, self.class_names, self.class_mids, chunk_samples, shard_chunks
        )
        self.base_attrs: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": STORE_KIND,
            "sample_rate": self.sample_rate,
            "source": source,
            "config": self.signature["config"],
            "chunk_samples": self.chunk_samples,
            "shard_chunks": int(shard_chunks),
            "compression": compression,
            "all_chunks_written": True,  # zeros too: see `_array`
            "num_classes": self.num_classes,
            "job": self.signature,
        }
        # Everything kept in memory: per-clip metadata of all clips so far; audio from `origin` onwards.
        self.names: list[str] = []
        self.lengths: list[int] = []
        self.offsets: list[int] = []
        self.label_counts: list[int] = []
        self.label_indices: list[int] = []
        self.any_labels = False
        self.failures: list[dict] = []
        self._failures_written = 0  # entries of the `failures` array that hold `self.failures[i]`
        self.items_done = 0  # input items consumed (clips + failures) up to the last clip held
        self.written = 0  # samples committed to `audio` (a multiple of shard_samples until the end)
        self.committed_clips = 0
        self.committed_items = 0
        self.complete_store: AudioStore | None = None
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._origin = 0  # sample index of the first pending sample
        self._seen: set[str] = set()
        self.clip_items: list[int] = []  # input item index of each clip
        self._label_start = 0  # label_indices entries of the committed clips
        self._arrays: dict[str, zarr.Array] = {}
        self._open(overwrite)

    # -- opening / resuming ---------------------------------------------------------------------------------
    def _open(self, overwrite: bool) -> None:
        existing = self._try_open_existing()
        if overwrite:
            # Replaces an audio store only: any other data there is refused below, never deleted.
            ours, existing = existing is not None and existing.attrs.get("kind") == STORE_KIND, None
        if existing is not None:
            attrs = dict(existing.attrs)
            if attrs.get("kind") != STORE_KIND:
                raise OutputExistsError(f"{self.url}: exists and is not an audio store; pick another output")
            if attrs.get("job") != self.signature:
                raise OutputExistsError(
                    f"{self.url}: an audio store written with other arguments is already there; pass "
                    "overwrite=true to replace it, or choose another output"
                )
            if attrs.get("complete"):
                log.info("%s: complete audio store with the same arguments exists; reusing it", self.url)
                self.complete_store = AudioStore(self.url, existing)
                return
            removed = remove_partial_writes(self.url)
            if removed:
                log.info("%s: removed %d partial writes left by the interrupted run", self.url, removed)
            self.group = _open_group(self.url, "r+")
            self._resume(attrs.get("progress"))
            return
        check_free_for_store(self.url, "audio store", ours=overwrite and ours)
        self.group = _open_group(self.url, "w")
        self._create_arrays()

    def _try_open_existing(self) -> zarr.Group | None:
        try:
            return _open_group(self.url, "r")
        except _NOT_FOUND:
            return None

    def _create_arrays(self) -> None:
        g = self.group
        g.attrs.update({**self.base_attrs, "complete": False, "progress": None})
        # Byte shuffle groups the high bytes of int16 samples: ~25% smaller than zstd alone on quiet audio.
        compressor = (
            BloscCodec(cname="zstd", clevel=3, shuffle="shuffle") if self.compression == "zstd" else None
        )
        g.create_array(
            "audio",
            shape=(0,),
            dtype="int16",
            chunks=(self.chunk_samples,),
            shards=(self.shard_samples,),
            compressors=compressor,
            fill_value=0,
        )
        for name, dtype in (
            ("lengths", "int64"),
            ("offsets", "int64"),
            ("label_indptr", "int64"),
            ("label_indices", "int32"),
        ):
            g.create_array(name, shape=(0,), dtype=dtype, chunks=(_META_CHUNK,), fill_value=0)
        g.create_array("names", shape=(0,), dtype=str, chunks=(_META_CHUNK,))
        # One JSON record per entry, appended at each commit: in the attributes the list would be rewritten
        # whole at every shard commit and parsed by every later open of the store.
        g.create_array("failures", shape=(0,), dtype=str, chunks=(_FAILURES_CHUNK,))
        for name, values in (("class_names", self.class_names), ("class_mids", self.class_mids)):
            if values is not None:
                # Variable-length UTF-8: the one string type with a Zarr v3 spec in zarr 3.1.
                arr = g.create_array(name, shape=(len(values),), dtype=str, chunks=(max(1, len(values)),))
                if values:
                    arr = arr.with_config({"write_empty_chunks": True})
                    arr[:] = np.array(values, dtype=object).astype(str)

    def _resume(self, progress: dict | None) -> None:
        g = self.group
        if not progress:
            # Killed before the first commit: nothing worth keeping, start clean.
            self.group = _open_group(self.url, "w")
            self._create_arrays()
            return
        n = int(progress["clips"])
        self.names = [str(s) for s in g["names"][:n]]
        self.lengths = [int(x) for x in g["lengths"][:n]]
        self.offsets = [int(x) for x in g["offsets"][:n]]
        indptr = np.asarray(g["label_indptr"][: n + 1], dtype=np.int64)
        self.label_counts = np.diff(indptr).tolist()
        self.label_indices = [int(x) for x in g["label_indices"][: int(indptr[-1])]] if n else []
        self._label_start = len(self.label_indices)
        self.clip_items = [-1] * n  # not needed for clips already committed
        self.any_labels = bool(progress.get("any_labels"))
        committed_failures = progress.get("failures", 0)
        if isinstance(committed_failures, list):  # begun by a version that kept them in the attributes
            self.failures = list(committed_failures)
            if "failures" not in g:
                g.create_array("failures", shape=(0,), dtype=str, chunks=(_FAILURES_CHUNK,))
        else:
            self.failures = [_failure_record(t, keep_item=True) for t in g["failures"][:committed_failures]]
            self._failures_written = len(self.failures)
        self.items_done = self.committed_items = int(progress["items"])
        self.committed_clips = n
        self.written = int(progress["samples"])
        self._origin = self.offsets[-1] + self.lengths[-1] if n else 0
        self._seen = set(self.names)
        if self._origin > self.written:
            raise InputError(f"{self.url}: corrupt progress record {progress}; rerun with overwrite=true")
        # Samples [origin, written) in the store began a clip that was not committed. The rerun may not write
        # that clip again (it may fail to decode now, or have changed), so the shard where it began is written
        # again: it goes back to the pending buffer, its committed clips' samples read from the store, and is
        # rewritten whole (shard objects are replaced whole, so a kill in between leaves the old one).
        shard_start = self._origin // self.shard_samples * self.shard_samples
        if shard_start < self.written:
            self._pending = [np.asarray(self._array("audio")[shard_start : self._origin], dtype=np.int16)]
            self._pending_samples = self._origin - shard_start
            self._origin = self.written = shard_start
        log.info(
            "%s: resuming after %d committed clips (%d input items, %.2f h of audio)",
            self.url,
            n,
            self.items_done,
            self._origin / self.sample_rate / 3600,
        )

    # -- appending --------------------------------------------------------------------------------
    def add(self, name: str, waveform: np.ndarray | torch.Tensor, labels: Sequence[int] | None) -> None:
        """Append one clip (float32 in [-1, 1] or int16, mono, at the store's sample rate)."""
        if name in self._seen:
            raise InputError(f"{self.url}: duplicate clip name {name!r}")
        samples = _to_int16(waveform, name)
        if samples.size == 0:
            raise InputError(f"clip {name!r}: empty waveform")
        label_list = [] if labels is None else [int(x) for x in labels]
        if labels is not None:
            self.any_labels = True
        if label_list and self.num_classes is not None:
            bad = [x for x in label_list if not 0 <= x < self.num_classes]
            if bad:
                raise InputError(f"clip {name!r}: class indices {bad} outside 0..{self.num_classes - 1}")
        self._seen.add(name)
        end = self._origin + self._pending_samples
        gap = self._gap_before(end, int(samples.size))
        if gap:
            self._pending.append(np.zeros(gap, dtype=np.int16))
            self._pending_samples += gap
        self.names.append(name)
        self.lengths.append(int(samples.size))
        self.offsets.append(end + gap)
        uniq = sorted(set(label_list))
        self.label_counts.append(len(uniq))
        self.label_indices.extend(uniq)
        self.clip_items.append(self.items_done)
        self.items_done += 1
        self._pending.append(samples)
        self._pending_samples += int(samples.size)
        while self._origin + self._pending_samples >= self.written + self.shard_samples:
            self._commit_shard()

    def _gap_before(self, position: int, length: int) -> int:
        """Zeros to skip so that a clip of `length` starting at `position` does not cross a chunk boundary."""
        into = position % self.chunk_samples
        if into and length <= self.chunk_samples and into + length > self.chunk_samples:
            return self.chunk_samples - into
        return 0

    def add_failure(self, record: dict) -> None:
        """Record an input that could not become a clip (`{"path" or "name": ..., "reason": ...}`)."""
        self.failures.append({**record, "_item": self.items_done})
        self.items_done += 1

    def _pending_array(self) -> np.ndarray:
        if len(self._pending) != 1:
            self._pending = [np.concatenate(self._pending)] if self._pending else [np.zeros(0, np.int16)]
        return self._pending[0]

    def _commit_shard(self) -> None:
        buffer = self._pending_array()
        start = self.written - self._origin
        audio = self._array("audio")
        self._grow(audio, self.written + self.shard_samples)
        audio[self.written : self.written + self.shard_samples] = buffer[start : start + self.shard_samples]
        self.written += self.shard_samples
        # Clips that now lie wholly in committed shards leave the buffer and become resumable.
        ends = np.add(self.offsets[self.committed_clips :], self.lengths[self.committed_clips :])
        newly = int(np.searchsorted(ends, self.written, side="right"))
        if newly:
            drop = int(ends[newly - 1]) - self._origin
            self._pending = [buffer[drop:]]
            self._pending_samples -= drop
            self._origin += drop
            new_clips = self.committed_clips + newly
            self._write_metadata(self.committed_clips, new_clips)
            self.committed_clips = new_clips
            # Failures after the last committed clip are not committed: a resumed run meets them again.
            self.committed_items = self.clip_items[new_clips - 1] + 1
        self._write_progress()

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            # Zeros too (zarr skips chunks equal to the fill value by default): then a missing object in a
            # complete store is damage that readers report, not 160 s of silence or a clip without labels.
            self._arrays[name] = self.group[name].with_config({"write_empty_chunks": True})
        return self._arrays[name]

    @staticmethod
    def _grow(arr: zarr.Array, size: int) -> None:
        # Capacity doubles (a metadata-only resize) so that appends rarely touch array metadata; `finish`
        # trims every array to its exact size.
        if arr.shape[0] < size:
            _resize(arr, max(size, 2 * arr.shape[0]))

    def _write_metadata(self, start: int, stop: int) -> None:
        # Always called for the clips right after the last committed one, so offsets continue from there.
        lengths = np.asarray(self.lengths[start:stop], dtype=np.int64)
        offsets = np.asarray(self.offsets[start:stop], dtype=np.int64)
        label_lo = self._label_start
        counts = np.asarray(self.label_counts[start:stop], dtype=np.int64)
        # label_indptr has N+1 entries: entry `start` is rewritten (same value) so the array stays contiguous.
        indptr = np.concatenate([[label_lo], label_lo + np.cumsum(counts)]).astype(np.int64)
        label_hi = int(indptr[-1])
        for name, data, lo in (
            ("lengths", lengths, start),
            ("offsets", offsets, start),
            ("label_indptr", indptr, start),
            ("label_indices", np.asarray(self.label_indices[label_lo:label_hi], dtype=np.int32), label_lo),
            ("names", np.array(self.names[start:stop], dtype=object).astype(str), start),
        ):
            arr = self._array(name)
            hi = int(lo) + len(data)
            self._grow(arr, hi)
            if len(data):
                arr[int(lo) : hi] = data
        self._label_start = label_hi

    def _chunks_written(self) -> dict[str, int]:
        """The record readers check (`audio_layout.written_arrays`): per array, the chunk objects its shape
        implies that are there now (all of them, unless a store begun by an older version skipped some)."""
        counts = {}
        for name in self.group.array_keys():
            arr = self.group[name]
            counts[name] = object_count(arr) - len(missing_objects(self.url, name, arr))
        return counts

    def _write_failures(self, stop: int) -> None:
        """Append `self.failures[written:stop]` to the `failures` array (only new records are written)."""
        if stop > self._failures_written:
            arr = self._array("failures")
            self._grow(arr, stop)
            records = self.failures[self._failures_written : stop]
            arr[self._failures_written : stop] = np.array(
                [json.dumps(f) for f in records], dtype=object
            ).astype(str)
            self._failures_written = stop

    def _write_progress(self) -> None:
        # Failures come in input order (duplicates, known first, carry item -1): the committed ones lead.
        committed = self._failures_written
        while committed < len(self.failures) and self.failures[committed]["_item"] < self.committed_items:
            committed += 1
        self._write_failures(committed)
        self.group.attrs["progress"] = {
            "clips": self.committed_clips,
            "items": self.committed_items,
            "samples": self.written,
            "any_labels": self.any_labels,
            "failures": committed,
        }

    def skip_items(self) -> int:
        """How many input items an earlier run already committed (the caller skips that many)."""
        return self.committed_items

    # -- finishing --------------------------------------------------------------------------------
    def finish(self) -> AudioStore:
        """Write the last partial shard and the final metadata; mark the store complete."""
        if self.complete_store is not None:
            return self.complete_store
        if not self.names:
            raise InputError(f"{self.url}: no clip could be written (all inputs failed or none were given)")
        buffer = self._pending_array()
        total = self._origin + self._pending_samples
        audio = self._array("audio")
        _resize(audio, total)
        if total > self.written:
            audio[self.written : total] = buffer[self.written - self._origin : total - self._origin]
        self.written = total
        self._write_metadata(self.committed_clips, len(self.names))
        self.committed_clips = len(self.names)
        self._write_failures(len(self.failures))
        n = len(self.names)
        sizes = {"lengths": n, "offsets": n, "names": n, "label_indptr": n + 1}
        sizes["label_indices"] = len(self.label_indices)
        sizes["failures"] = len(self.failures)
        for name, size in sizes.items():
            # Trim the doubled capacity (and whatever a killed run left past its last commit).
            if self._array(name).shape[0] != size:
                _resize(self._array(name), size)
        lengths = np.asarray(self.lengths, dtype=np.int64)
        self.group.attrs.update(
            {
                **self.base_attrs,
                "chunks_written": self._chunks_written(),
                "fingerprint": _fingerprint(self.names, lengths),
                "num_clips": len(self.names),
                "num_samples": int(lengths.sum()),
                "has_labels": self.any_labels,
                "num_failures": len(self.failures),
                "progress": None,
                "complete": True,
            }
        )
        return AudioStore.open(self.url)


def write_audio_store(
    url: str | os.PathLike,
    clips: Iterable[tuple[str, np.ndarray | torch.Tensor, Sequence[int] | None]],
    **options: Any,
) -> AudioStore:
    """Write `(name, waveform, labels)` clips (16 kHz mono, float32 in [-1, 1] or int16) to a new store.

    `options` are `AudioStoreWriter`'s keyword arguments (class_names, class_mids, source, config,
    overwrite, chunk_samples, shard_chunks, compression), passed on rather than spelt out a second time.
    A complete store at `url` written with the same source/config/classes is returned as it is, an
    incomplete one resumes (the first clips it committed are skipped from `clips`); other stores there are
    refused unless `overwrite`.
    """
    with store_lock(url, "writer"):
        writer = AudioStoreWriter(url, **options)
        if writer.complete_store is not None:
            return writer.complete_store
        skip = writer.skip_items()
        for k, (name, waveform, labels) in enumerate(clips):
            if k < skip:
                continue
            writer.add(name, waveform, labels)
        return writer.finish()
