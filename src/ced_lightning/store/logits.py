"""LogitStore: the teachers' top-k probabilities and the exact augmentation of every (epoch, clip), Zarr v3.

Layout (documented for other tools in `docs/logit_store.md`):

    <root>/zarr.json                 attributes: identity of the extraction (teachers, recipe, seed, ...)
    topk_indices   uint16  [E, N, k] class indices, each row by descending probability
    topk_values    float16 | uint8 [E, N, k] quantized probabilities (`ced_lightning.core.quantize`)
    params/<name>  field dtype [E, N, *shape] one array per augmentation parameter field
    <extra>        dtype   [E, N]    optional per (epoch, clip) arrays named in the `extra_arrays` attribute
                                     (e.g. `legacy_seeds` of an imported store); `has_targets` uint8, when
                                     present, marks the (epoch, clip) pairs that have teachers' rows: the
                                     student leaves the others out of that epoch
    block_done     uint8   [num_blocks] 0 until block b's rows are written, then its precision code (chunk
                                        size 1, unsharded): 1 full (32/64-bit), 2 reduced (16-bit, TF32)
    segment_clip   int32   [N]       only in stores of segments (`segment_samples` attribute): the clip of
    segment_start  int64   [N]       each row and its first sample (`ced_lightning.store.segments`); without
                                     them row i is clip i from its start (N = num_clips)
    segment_length int64   [N]       optional, in stores of segments: the most samples each row reads (an
                                     imported release: the span the teachers heard)

N is the number of rows: one per clip, or one per segment of a clip (attribute `num_segments`).

Every data array is sharded by block: one shard holds all E epochs of `block_clips` consecutive clips, split
into one inner chunk per epoch. A block is written by exactly one process in one call that covers whole
shards, so no two processes ever write the same shard (zarr loses data when different chunks of one shard
are written concurrently), and reading one epoch for all clips reads one inner chunk per shard.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import zarr

from ced_lightning.core.augment import AugmentParams, AugmentRecipe
from ced_lightning.core.errors import InputError, MissingInputError
from ced_lightning.core.quantize import dequantize, quantization_attrs, quantize
from ced_lightning.store.files import check_free_for_store, store_exists, store_nbytes
from ced_lightning.store.integrity import missing_block_objects, read_checked, reopen_strict
from ced_lightning.store.logit_layout import WRITE_ALL, LogitStoreLayout
from ced_lightning.store.remote import redact_url
from ced_lightning.store.segments import SegmentTable

log = logging.getLogger(__name__)

FORMAT = "ced-lightning/logit-store"
FORMAT_VERSION = 1

# Attributes that define what the store holds: a store with other values here is another extraction, and
# resuming into it would mix two. `num_classes` and `num_clips` follow from teachers and audio store.
IDENTITY_KEYS: tuple[str, ...] = (
    "teachers",
    "combine",
    "augment_recipe",
    "seed",
    "epochs",
    "topk",
    "num_classes",
    "quantization",
    "audio_fingerprint",
    "num_clips",
    "clip_samples",
    "block_clips",
    "teacher_precision",
    "segment_samples",
)

# Optional [E, N] uint8 extra array: 1 where the (epoch, clip) has the teachers' top-k, 0 where it has none
# (an imported release that lacks a clip); a store without it has targets everywhere.
HAS_TARGETS = "has_targets"

_CREATING = "creation_incomplete"  # attribute present only while `LogitStore.create` runs

# `block_done` values: how the block's teachers computed, which decides how closely a replay can match it.
BLOCK_FULL_PRECISION = 1  # float32/float64 matmuls (stores written before codes existed hold 1 as well)
BLOCK_REDUCED_PRECISION = 2  # bf16/fp16 (mixed or true) or TF32 matmuls

WHAT = "logit store"


@dataclass
class EpochSlice:
    """One augmentation epoch for every clip: what a distillation data loader holds for an epoch."""

    indices: np.ndarray  # uint16 [N, k]
    probs: np.ndarray  # float32 [N, k]
    params: AugmentParams  # [N]
    # bool [N]: which clips have targets in this epoch (None: all; see HAS_TARGETS)
    has_targets: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.indices.shape[0])


def _jsonable(value: Any) -> Any:
    """Attributes as plain JSON (tuples -> lists, numpy scalars -> Python), so comparisons are exact."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class LogitStore:
    """Reader and block writer of a logit store (see the module docstring for the layout)."""

    def __init__(self, group: zarr.Group, url: str) -> None:
        self._group = group
        self.url = url
        self.attrs: dict[str, Any] = dict(group.attrs)
        a = self.attrs
        self.epochs: int = int(a["epochs"])
        self.topk: int = int(a["topk"])
        self.num_classes: int = int(a["num_classes"])
        self.class_names: list[str] | None = list(a["class_names"]) if a.get("class_names") else None
        self.recipe: AugmentRecipe = AugmentRecipe.from_dict(a["augment_recipe"])
        # None for an imported store: its parameters come from the original's per-clip seeds, not ours.
        self.seed: int | None = int(a["seed"]) if a.get("seed") is not None else None
        self.audio_fingerprint: str = str(a["audio_fingerprint"])
        self.audio_url: str = str(a.get("audio_store", ""))
        # Extracted over a list of audio stores read as one (`store.concat`): each one's URL, fingerprint and
        # clip count; None for a single store.
        self.audio_sources: list[dict[str, Any]] | None = a.get("audio_sources")
        self.clip_samples: int = int(a["clip_samples"])
        self.quantization: str = str(a["quantization"]["kind"])
        self.block_clips: int = int(a["block_clips"])
        self.num_clips: int = int(a["num_clips"])
        # Rows: one per segment in a store of segments, else one per clip (every store before segments).
        self.segment_samples: int | None = (
            int(a["segment_samples"]) if a.get("segment_samples") is not None else None
        )
        self.num_rows: int = int(a["num_segments"]) if self.segment_samples is not None else self.num_clips
        self._segments: SegmentTable | None = None
        self.teachers: list[dict[str, Any]] = list(a["teachers"])
        self.combine: str = str(a["combine"])
        # Each teacher's weight in the combine (`weight` of its record; 1 where absent, as before weights).
        self.teacher_weights: list[float] = [float(t.get("weight", 1.0)) for t in self.teachers]
        # None: a store written before it was recorded (its blocks' codes still say how each was computed).
        self.teacher_precision: str | None = a.get("teacher_precision")
        self.num_blocks: int = -(-self.num_rows // self.block_clips)
        self._fields = AugmentParams.fields(self.recipe)
        self.extra_arrays: dict[str, str] = dict(a.get("extra_arrays") or {})
        # What must be there (`store.integrity`): each data array's shard of a done block, or in stores made
        # before `all_chunks_written` (zarr skipped all-zero shards there) the top-k arrays' only.
        self.all_chunks_written = bool(a.get("all_chunks_written"))
        written = self.data_arrays() if self.all_chunks_written else ["topk_indices", "topk_values"]
        self.block_arrays = frozenset(written)  # each shard of a done block must be there
        self._whole_arrays = frozenset(("segment_clip", "segment_start") if self.all_chunks_written else ())
        self._done: set[int] = set()  # blocks known done: their data objects must be there
        self._group = reopen_strict(group, url, self._expected, WHAT)

    # ----------------------------------------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        url: str,
        layout: LogitStoreLayout,
        *,
        teachers: list[dict[str, Any]],
        combine: str,
        seed: int | None,
        audio_fingerprint: str,
        audio_url: str,
        audio_sources: Sequence[Mapping[str, Any]] | None = None,
        teacher_precision: str | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> LogitStore:
        """Create every array of `layout` at full size, or reopen a store of the same extraction to resume it.

        A store at `url` made with other settings is refused with an InputError naming each difference. Call
        on one process before any process writes (creation is idempotent, so every rank may call it in turn).
        The keywords say what fills it: the teachers and how they combine, the seed of the augmentation
        draws (None: parameters from elsewhere, e.g. an imported release's seeds), the audio store (its
        fingerprint, URL and, for a list of stores read as one, each member's record). `teacher_precision`
        (Lightning's name, e.g. `32-true`) is how the teachers compute; stores written before it was
        recorded resume at any precision (each block's `block_done` code records its own). `provenance` is
        kept as a plain attribute (where the values came from).
        """
        url = str(url)
        layout = layout.checked(url)
        segments, extra_arrays = layout.segments, layout.extra_arrays
        attrs = _jsonable(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "teachers": teachers,
                "combine": combine,
                "augment_recipe": layout.recipe.to_dict(),
                "seed": int(seed) if seed is not None else None,
                "epochs": int(layout.epochs),
                "topk": int(layout.topk),
                "num_classes": int(layout.num_classes),
                "class_names": list(layout.class_names) if layout.class_names is not None else None,
                "quantization": quantization_attrs(layout.quantization),
                "audio_fingerprint": str(audio_fingerprint),
                "audio_store": redact_url(audio_url),  # a URL's credentials stay out of the store
                "num_clips": int(layout.num_clips),
                "clip_samples": int(layout.clip_samples),
                "block_clips": int(layout.block_clips),
                "row_order": "probability_descending",
                "all_chunks_written": True,
                **(
                    {"extra_arrays": {k: np.dtype(v).name for k, v in extra_arrays.items()}}
                    if extra_arrays
                    else {}
                ),
                **({"provenance": dict(provenance)} if provenance else {}),
                **({"teacher_precision": str(teacher_precision)} if teacher_precision else {}),
                # The members of a list of audio stores (their combined fingerprint is audio_fingerprint).
                **({"audio_sources": [dict(s) for s in audio_sources]} if audio_sources else {}),
                **(
                    {"segment_samples": int(segments.segment_samples), "num_segments": len(segments)}
                    if segments is not None
                    else {}
                ),
            }
        )
        if store_exists(url) and not _interrupted_creation(url):
            store = cls.open(url)
            old, new = _identity(store.attrs), _identity(attrs)
            differences = [
                f"{key}: stored {old[key]!r}, requested {new[key]!r}"
                for key in IDENTITY_KEYS
                if old[key] != new[key] and not (key == "teacher_precision" and old[key] is None)
            ]
            if differences:
                raise InputError(
                    f"logit store {url} exists and was made with other settings:\n  "
                    + "\n  ".join(differences)
                    + "\nChoose another output, or delete the existing store to start over."
                )
            if store.attrs.get("audio_store") != attrs["audio_store"]:
                log.info("resuming %s (same audio fingerprint, audio store now at %s)", url, audio_url)
            return store

        if store_exists(url):
            log.info("%s: its creation was interrupted before it held any block; creating it again", url)
        check_free_for_store(url, "logit store", ours=True)  # a store here is our interrupted creation
        # Marked as ours and unfinished first, so that a run killed before the end can recreate it.
        group = zarr.open_group(url, mode="w", zarr_format=3, attributes={"format": FORMAT, _CREATING: True})
        layout.create_arrays(group)
        # Attributes last, in one write that also drops the creation mark.
        group.attrs.put(attrs)
        return cls(zarr.open_group(url, mode="r+", zarr_format=3), url)

    @classmethod
    def open(cls, url: str) -> LogitStore:
        """Open a logit store by path or fsspec URL."""
        url = str(url)
        if not store_exists(url):
            raise MissingInputError(
                f"no logit store at {url} (no zarr.json). Make one with: python -m ced_lightning.extract "
                f"audio_store=... output={url} teacher=..."
            )
        try:
            group = zarr.open_group(url, mode="r+", zarr_format=3)
        except (PermissionError, OSError):
            group = zarr.open_group(url, mode="r", zarr_format=3)
        except Exception as err:
            raise InputError(f"{url} is not a Zarr v3 group: {err}") from err
        if group.attrs.get(_CREATING):
            raise InputError(
                f"{url}: its creation was interrupted (it holds no block yet); the extract command run again "
                "creates it anew"
            )
        if group.attrs.get("format") != FORMAT:
            raise InputError(
                f"{url} is not a logit store (attribute 'format' is {group.attrs.get('format')!r}, expected "
                f"{FORMAT!r}); choose another output, or delete it if it is a leftover"
            )
        version = group.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise InputError(
                f"{url}: logit store format_version {version}, this version reads {FORMAT_VERSION}"
            )
        return cls(group, url)

    # ----------------------------------------------------------------------------------------------- blocks
    def __len__(self) -> int:
        """Rows: segments in a store of segments, else clips."""
        return self.num_rows

    def segments(self) -> SegmentTable:
        """Row -> (clip, start sample): the stored positions, or one row per clip at 0 (stores without)."""
        if self._segments is None:
            if self.segment_samples is None:
                self._segments = SegmentTable.one_per_clip(self.num_clips, self.clip_samples)
            else:
                lengths = self._group.get("segment_length")
                self._segments = SegmentTable(
                    np.asarray(self._read("segment_clip", slice(None)), dtype=np.int32),
                    np.asarray(self._read("segment_start", slice(None)), dtype=np.int64),
                    self.segment_samples,
                    np.asarray(lengths[:], dtype=np.int64) if lengths is not None else None,
                )
        return self._segments

    def __repr__(self) -> str:
        rows = f", segments={self.num_rows}" if self.segment_samples is not None else ""
        return (
            f"LogitStore({self.url!r}, clips={self.num_clips}{rows}, epochs={self.epochs}, topk={self.topk}, "
            f"quantization={self.quantization}, blocks done={self.num_blocks - len(self.missing_blocks())}/"
            f"{self.num_blocks})"
        )

    def block_range(self, b: int) -> tuple[int, int]:
        """Rows `[start, stop)` of block `b`."""
        if not 0 <= b < self.num_blocks:
            raise IndexError(f"block {b} out of range: the store has {self.num_blocks} blocks")
        start = b * self.block_clips
        return start, min(start + self.block_clips, self.num_rows)

    def done_mask(self) -> np.ndarray:
        return self.block_codes() > 0

    def block_codes(self) -> np.ndarray:
        """Every block's `block_done` code: 0 missing, `BLOCK_FULL_PRECISION` or `BLOCK_REDUCED_PRECISION`."""
        codes = np.asarray(self._read("block_done", slice(None)))
        self._done = {int(b) for b in np.flatnonzero(codes)}
        return codes

    def missing_blocks(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(~self.done_mask())]

    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    def write_block(
        self,
        b: int,
        indices: np.ndarray,
        probs: np.ndarray,
        params: Sequence[AugmentParams],
        reduced_precision: bool = False,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Quantize and write block `b` for all epochs, then mark it done with its precision code.

        `indices` and `probs` are `[E, n, k]` (n = the block's clip count, any row order), `params` one
        `AugmentParams` of length n per epoch, `extra` one `[E, n]` array per name of `extra_arrays`. The
        completion flag is written after the data, so a process
        killed mid-block leaves the block missing and a rerun writes it again in full.
        """
        start, stop = self.block_range(b)
        n = stop - start
        indices = np.asarray(indices)
        probs = np.asarray(probs, dtype=np.float32)
        expected = (self.epochs, n, self.topk)
        if indices.shape != expected or probs.shape != expected:
            raise ValueError(
                f"block {b}: expected indices and probs of shape {expected} (epochs, clips, topk), "
                f"got {indices.shape} and {probs.shape}"
            )
        if len(params) != self.epochs:
            raise ValueError(
                f"block {b}: expected {self.epochs} AugmentParams (one per epoch), got {len(params)}"
            )
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_classes):
            raise ValueError(f"block {b}: class indices outside 0..{self.num_classes - 1}")
        extra = dict(extra or {})
        if extra.keys() != self.extra_arrays.keys():
            raise ValueError(
                f"block {b}: extra arrays {sorted(extra)}, the store has {sorted(self.extra_arrays)}"
            )
        for name, value in extra.items():
            if np.shape(value) != (self.epochs, n):
                raise ValueError(
                    f"block {b}: extra array {name!r} of shape {np.shape(value)}, expected {(self.epochs, n)}"
                )
        # Rows by descending probability (what torch.topk gives already): the quantized values then form
        # smooth runs, and a reader's first column is each clip's top class.
        order = np.argsort(-probs, axis=-1, kind="stable")
        indices = np.take_along_axis(indices, order, axis=-1).astype(np.uint16)
        probs = np.take_along_axis(probs, order, axis=-1)
        region = (slice(None), slice(start, stop))
        self._array("topk_indices")[region] = indices
        self._array("topk_values")[region] = quantize(probs, self.quantization)
        for name, (dtype, row) in self._fields.items():
            stacked = []
            for e, p in enumerate(params):
                if len(p) != n:
                    raise ValueError(f"block {b}: epoch {e} has parameters for {len(p)} clips, not {n}")
                value = np.asarray(p.values[name])
                if value.shape != (n, *row):
                    raise ValueError(
                        f"block {b}: augmentation field {name!r} has shape {value.shape}, "
                        f"expected {(n, *row)}"
                    )
                stacked.append(value.astype(dtype, copy=False))
            self._array(f"params/{name}")[region] = np.stack(stacked)
        for name, value in extra.items():
            self._array(name)[region] = np.asarray(value).astype(self.extra_arrays[name])
        self._group["block_done"][b] = BLOCK_REDUCED_PRECISION if reduced_precision else BLOCK_FULL_PRECISION
        self._done.add(b)

    # ----------------------------------------------------------------------------------------------- reading
    def _expected(self, array: str, key: str) -> bool:
        """Whether the object `key` of `array` must be there (called from zarr's I/O: no reads here)."""
        parts = key.split("/")  # c/<epoch shard>/<block>/...: one shard per block holds every epoch
        done = (
            array in self.block_arrays
            and len(parts) > 2
            and parts[2].isdigit()
            and int(parts[2]) in self._done
        )
        return done or array in self._whole_arrays

    def _read(self, name: str, selection: Any) -> Any:
        """`array[selection]`: a missing object of a done block or a chunk that does not decode is a
        `StoreDamagedError` naming the store, the array and the chunk key."""
        return read_checked(self._group[name], selection, self.url, name, WHAT)

    def data_arrays(self) -> list[str]:
        """The `[E, N, ...]` arrays: top-k, augmentation parameters, extra arrays."""
        return ["topk_indices", "topk_values", *(f"params/{n}" for n in self._fields), *self.extra_arrays]

    def absent_objects(self, blocks: Sequence[int]) -> list[str]:
        """`array/key` of each shard of `blocks` missing from a data array (one listing per array)."""
        return missing_block_objects(self.url, self._group, self.data_arrays(), blocks)

    def _array(self, name: str) -> zarr.Array:
        return self._group[name].with_config(WRITE_ALL)

    def _check_epoch(self, epoch: int) -> None:
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"epoch {epoch} out of range: {self.url} holds epochs 0..{self.epochs - 1}")

    def read(self, epoch: int, i: int) -> tuple[np.ndarray, np.ndarray, AugmentParams]:
        """Row `i` of augmentation epoch `epoch`: (class indices int64 [k], probs float32 [k], params)."""
        self._check_epoch(epoch)
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range: {self.url} holds {self.num_rows} rows")
        block = i // self.block_clips
        if not self._read("block_done", block):
            raise InputError(f"{self.url}: row {i} lies in block {block}, which is not extracted yet")
        self._done.add(block)
        indices = np.asarray(self._read("topk_indices", (epoch, i))).astype(np.int64)
        probs = dequantize(self._read("topk_values", (epoch, i)), self.quantization)
        params = AugmentParams(
            {
                name: np.asarray(self._read(f"params/{name}", (epoch, slice(i, i + 1))))
                for name in self._fields
            }
        )
        return indices, probs, params

    def read_epoch(self, epoch: int) -> EpochSlice:
        """All clips of one augmentation epoch; refuses an incomplete store, naming its missing blocks."""
        self._check_epoch(epoch)
        missing = self.missing_blocks()
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise InputError(
                f"logit store {self.url} is incomplete: {len(missing)} of {self.num_blocks} blocks missing "
                f"({shown}). Finish it by running the same python -m ced_lightning.extract command again."
            )
        indices = np.asarray(self._read("topk_indices", epoch))
        probs = dequantize(self._read("topk_values", epoch), self.quantization)
        params = AugmentParams(
            {name: np.asarray(self._read(f"params/{name}", epoch)) for name in self._fields}
        )
        has_targets = (
            np.asarray(self._read(HAS_TARGETS, epoch)) > 0 if HAS_TARGETS in self.extra_arrays else None
        )
        return EpochSlice(indices=indices, probs=probs, params=params, has_targets=has_targets)

    def read_extra(self, name: str) -> np.ndarray:
        """One of the store's `extra_arrays`, all epochs and clips (`[E, N]`)."""
        if name not in self.extra_arrays:
            raise KeyError(f"{self.url} has no extra array {name!r} (it has {sorted(self.extra_arrays)})")
        self.block_codes()  # the blocks done now: their objects must be there
        return np.asarray(self._read(name, slice(None)))

    def nbytes_stored(self) -> int:
        """Bytes on disk (or in the object store) of everything under the store's root."""
        return store_nbytes(self.url)

    def bytes_per_clip_epoch(self) -> float:
        """Stored bytes per (row, epoch) of the data arrays (metadata, positions and completion flags
        excluded); a row is a segment in a store of segments."""
        fs, path = fsspec.core.url_to_fs(self.url)
        root = path.rstrip("/")
        data = 0
        for name in (
            "topk_indices",
            "topk_values",
            *(f"params/{n}" for n in self._fields),
            *self.extra_arrays,
        ):
            if fs.exists(f"{root}/{name}/c"):
                data += int(fs.du(f"{root}/{name}/c", total=True))
        return data / (self.num_rows * self.epochs)


def _identity(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes that must match for a resume; teachers by name, weights (sha256) and their weight in the
    ensemble (1 where a store has none), not by path, so a moved checkpoint still resumes."""
    out = {key: _jsonable(attrs.get(key)) for key in IDENTITY_KEYS}
    out["teachers"] = [
        {"name": t.get("name"), "sha256": t.get("sha256"), "weight": float(t.get("weight", 1.0))}
        for t in (attrs.get("teachers") or [])
    ]
    return out


def _interrupted_creation(url: str) -> bool:
    attrs = read_attrs(url)
    return attrs.get("format") == FORMAT and bool(attrs.get(_CREATING))


def read_attrs(url: str) -> Mapping[str, Any]:
    """The store's attributes without opening its arrays (for tools and error messages)."""
    return dict(zarr.open_group(str(url), mode="r", zarr_format=3).attrs)
