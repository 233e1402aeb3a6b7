"""The shape of a logit store: `LogitStoreLayout` says how many rows, epochs, top-k entries and classes it
holds, how they are quantized, which augmentation fields and extra arrays it has and how they are chunked;
`create_arrays` makes them (`ced_lightning.store.logits` describes the layout for readers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from ced_lightning.core.augment import AugmentParams, AugmentRecipe
from ced_lightning.core.errors import ConfigError, InputError
from ced_lightning.core.quantize import stored_dtype
from ced_lightning.store.segments import SegmentTable

_ZSTD_LEVEL = 9
# Written with every chunk, fill values too (`write_empty_chunks`): a missing object is lost data.
WRITE_ALL = {"write_empty_chunks": True}


# eq=False: the segment table holds arrays, whose `==` is elementwise; layouts compare by identity.
@dataclass(frozen=True, eq=False)
class LogitStoreLayout:
    """What `LogitStore.create` makes: `[epochs, rows, ...]` arrays in blocks of `block_clips` rows.

    Rows are the `num_clips` clips of the audio store, or the rows of `segments` (`ced_lightning.store.
    segments`); a table of one segment per clip at 0 as long as `clip_samples` is the layout without it.
    `extra_arrays` (name -> dtype) adds `[E, N]` arrays that `LogitStore.write_block(extra=)` fills.
    """

    num_clips: int
    epochs: int
    topk: int
    num_classes: int
    quantization: str
    recipe: AugmentRecipe  # decides the `params/<name>` arrays
    clip_samples: int  # the teachers' input: the most samples a row reads
    block_clips: int  # rows per block: the unit one process writes (one shard per array)
    class_names: Sequence[str] | None = None
    segments: SegmentTable | None = None
    extra_arrays: Mapping[str, Any] | None = None

    @property
    def num_rows(self) -> int:
        return len(self.segments) if self.segments is not None else self.num_clips

    def checked(self, url: str) -> LogitStoreLayout:
        """This layout, refused with an error naming the setting where it cannot be stored at `url`; a
        segment table of one segment per clip at 0 as long as `clip_samples` becomes no table (the store
        then stays as stores were before segments)."""
        num_clips, topk, num_classes = self.num_clips, self.topk, self.num_classes
        if num_clips <= 0:
            raise InputError(f"logit store {url}: the audio store has no clips")
        if not 1 <= topk <= num_classes:
            raise ConfigError(f"topk must be between 1 and the number of classes ({num_classes}), not {topk}")
        if topk > np.iinfo(np.uint16).max or num_classes > np.iinfo(np.uint16).max + 1:
            raise InputError(f"{num_classes} classes do not fit the store's uint16 class indices")
        if self.epochs < 1 or self.block_clips < 1:
            raise ConfigError(f"epochs ({self.epochs}) and block_clips ({self.block_clips}) must be >= 1")
        if self.class_names is not None and len(self.class_names) != num_classes:
            raise InputError(f"{len(self.class_names)} class names for {num_classes} classes")
        segments = self.segments
        if segments is None:
            return self
        if segments.is_one_per_clip(num_clips) and segments.segment_samples == self.clip_samples:
            return dataclasses.replace(self, segments=None)
        if segments.segment_samples > self.clip_samples:
            raise ConfigError(
                f"segments of {segments.segment_samples} samples do not fit the teachers' input of "
                f"{self.clip_samples} (clip_samples): choose segment_seconds <= clip_seconds"
            )
        if len(segments) and (segments.clip.min() < 0 or segments.clip.max() >= num_clips):
            raise ValueError(f"the segment table names clips outside 0..{num_clips - 1}")
        return self

    def create_arrays(self, group: zarr.Group) -> None:
        """Every array of the layout in `group`, at full size and empty (fill 0); the segment positions
        written once, here: every rank reads them from the store."""
        epochs, rows, block = self.epochs, self.num_rows, self.block_clips

        def add_array(name: str, dtype: np.dtype, row: tuple[int, ...]) -> None:
            dtype = np.dtype(dtype)
            group.create_array(
                name,
                shape=(epochs, rows, *row),
                dtype=dtype,
                chunks=(1, block, *row),
                shards=(epochs, block, *row),
                compressors=compressors(dtype.itemsize),
                fill_value=0,
                # Only whole shards are written, so the default read-modify-write is never needed.
                dimension_names=("epoch", "clip", *(f"{name.split('/')[-1]}_{i}" for i in range(len(row)))),
                config=WRITE_ALL,
            )

        add_array("topk_indices", np.uint16, (self.topk,))
        add_array("topk_values", stored_dtype(self.quantization), (self.topk,))
        for name, (dtype, row) in AugmentParams.fields(self.recipe).items():
            add_array(f"params/{name}", dtype, tuple(row))
        for name, dtype in (self.extra_arrays or {}).items():
            add_array(name, np.dtype(dtype), ())
        group.create_array(
            "block_done",
            shape=(-(-rows // block),),
            dtype=np.uint8,
            chunks=(1,),
            compressors=None,
            fill_value=0,
            dimension_names=("block",),
        )
        segments = self.segments
        if segments is None:
            return
        positions = {"segment_clip": segments.clip, "segment_start": segments.start}
        if segments.length is not None:
            positions["segment_length"] = segments.length
        for name, values in positions.items():
            group.create_array(
                name,
                data=np.ascontiguousarray(values, dtype=np.int32 if name == "segment_clip" else np.int64),
                chunks=(max(1, min(rows, 64 * block)),),
                compressors=compressors(4 if name == "segment_clip" else 8),
                dimension_names=("clip",),
                config=WRITE_ALL,
            )


def compressors(itemsize: int) -> list:
    # Blosc's byte shuffle puts the high bytes of all values together (mostly equal for class indices < 527,
    # half floats of similar magnitude, small shifts), which zstd then compresses well. On AudioSet-like
    # top-20 rows it beat plain zstd, bit shuffle and class-sorted rows with a delta filter
    # (docs/logit_store.md), and it needs only Zarr v3 core codecs, so any Zarr v3 reader opens the store.
    return [BloscCodec(cname="zstd", clevel=_ZSTD_LEVEL, shuffle=BloscShuffle.shuffle, typesize=itemsize)]
