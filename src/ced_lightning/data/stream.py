"""The training read path: shuffled batches of clips read span by span from an `AudioStore`.

A read has a fixed cost whatever its size (0.5 ms through zarr, less for the direct reads of uncompressed
stores, more on object storage), so reading clips one call each wastes time. Training order is therefore
built from *spans* (by default the clips of one store chunk, read in one call; or runs of `span_clips`
neighbouring clips) in a shuffled span order, shuffled again inside *windows* of about `shuffle_window`
clips, and of at least `MIN_WINDOW_SPANS` spans: a chunk of short clips holds many (160 clips of 1 s), and a
window of one or two spans would fill whole batches with neighbours in the store.

Shuffle quality (a documented choice): every epoch visits every clip once in a new order; two clips that are
neighbours in the store land in the same window (so possibly the same batch) more often than under a full
shuffle. Clips sit in the store in the order of their source list, so keep that list unsorted by class (the
AudioSet lists are sorted by YouTube id, which is random with respect to content). `span_clips=1` with
`shuffle_window >= len(store)` is a full shuffle at the cost of one read per clip (and memory for the
window).

The plan of an epoch is a pure function of (seed, epoch, rank count, worker count), so a resumed run replays
the same batches; `ResumableLoader` records how many batches were consumed and skips them on resume.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ced_lightning.audio import int16_to_float, pack_clips
from ced_lightning.augment import counter_uniform
from ced_lightning.store import AudioStore

Batch = dict[str, Any]

# Stream ids of counter_uniform draws made here (augmentation uses its own).
_SPAN_ORDER, _RANK_SPLIT, _WINDOW_ORDER, _CROP = 0x5A01, 0x5A02, 0x5A03, 0x5A04

MIN_WINDOW_SPANS = 16


@dataclass(frozen=True)
class EpochPlan:
    """One rank's batches of one epoch, grouped in windows (a window is read and shuffled by one worker)."""

    windows: list[list[np.ndarray]]  # windows[w] = that window's batches (clip indices, in order)

    @property
    def num_batches(self) -> int:
        return sum(len(batches) for batches in self.windows)


def _hashed_order(seed: int, epoch: int, keys: np.ndarray, stream: int) -> np.ndarray:
    """A permutation of `keys` from counter hashing: independent of numpy's generator algorithms."""
    return keys[np.argsort(counter_uniform(seed, epoch, keys, stream), kind="stable")]


def plan_epoch(
    num_clips: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    span_clips: int = 16,
    shuffle_window: int = 256,
    span_bounds: np.ndarray | None = None,
) -> EpochPlan:
    """Split the epoch's clips into this rank's batches.

    Spans are dealt to ranks in the shuffled span order, so ranks read disjoint clips; every rank gets the
    same number of full batches (what DDP needs), the few clips beyond that are left out of this epoch
    (they come back in the next epoch's order).
    """
    if batch_size < 1 or span_clips < 1:
        raise ValueError("batch_size and span_clips must be at least 1")
    if span_bounds is None:
        span_bounds = np.append(np.arange(0, num_clips, span_clips, dtype=np.int64), num_clips)
    span_bounds = np.asarray(span_bounds, dtype=np.int64)
    if span_bounds[0] != 0 or span_bounds[-1] != num_clips or (np.diff(span_bounds) <= 0).any():
        raise ValueError(f"span_bounds must rise strictly from 0 to {num_clips}")
    # Small stores have few chunks: split long spans so that every rank still gets a fair share.
    longest = max(1, num_clips // (8 * world_size))
    if (np.diff(span_bounds) > longest).any():
        pieces = [np.arange(a, b, longest) for a, b in itertools.pairwise(span_bounds)]
        span_bounds = np.append(np.concatenate(pieces), num_clips)
    spans = np.arange(len(span_bounds) - 1, dtype=np.int64)
    if shuffle:
        spans = _hashed_order(seed, epoch, spans, _SPAN_ORDER)
    rank_spans = [spans[r::world_size] for r in range(world_size)]

    def clips_of(chosen: np.ndarray) -> np.ndarray:
        if len(chosen) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(span_bounds[j], span_bounds[j + 1]) for j in chosen])

    sequences = [clips_of(s) for s in rank_spans]
    num_batches = min(len(seq) for seq in sequences) // batch_size
    sequence = sequences[rank][: num_batches * batch_size]
    window = max(shuffle_window, MIN_WINDOW_SPANS * int(np.diff(span_bounds).max()))
    window_batches = max(1, math.ceil(window / batch_size)) if shuffle else max(1, num_batches)
    window_clips = window_batches * batch_size
    windows = []
    for w, begin in enumerate(range(0, len(sequence), window_clips)):
        clips = sequence[begin : begin + window_clips]
        if shuffle:
            # Keyed by (epoch, window, rank) so windows differ; clip indices keep the draw per clip.
            clips = clips[np.argsort(counter_uniform(seed, epoch * 65_537 + w, clips, _WINDOW_ORDER + rank))]
        windows.append([clips[b : b + batch_size] for b in range(0, len(clips), batch_size)])
    return EpochPlan(windows)


def worker_windows(plan: EpochPlan, worker: int, num_workers: int) -> list[list[np.ndarray]]:
    return plan.windows[worker::num_workers]


def loader_order(batches_per_worker: list[int]) -> list[tuple[int, int]]:
    """The (worker, batch number) sequence a DataLoader yields: round robin, skipping exhausted workers."""
    order, taken = [], [0] * len(batches_per_worker)
    while any(t < n for t, n in zip(taken, batches_per_worker)):
        for w, n in enumerate(batches_per_worker):
            if taken[w] < n:
                order.append((w, taken[w]))
                taken[w] += 1
    return order


def crop_offsets(
    lengths: np.ndarray, clip_samples: int, seed: int, epoch: int, indices: np.ndarray
) -> np.ndarray:
    """Random crop start per clip (0 where the clip is not longer than `clip_samples`)."""
    room = np.maximum(lengths - clip_samples, 0)
    uniform = counter_uniform(seed, epoch, indices, _CROP)
    return np.minimum((uniform * (room + 1)).astype(np.int64), room)


class ClipBatchStream(IterableDataset):
    """Yields collated training batches `{"index", "waveform" [B, T] int16, "length"}` (+ `transform`).

    Waveforms stay int16 until they reach the model's device (`Int16Batches.on_after_batch_transfer`
    converts them there).

    `clip_samples` fixes T: longer clips are cropped (from the start, or at a random offset keyed by
    (seed, epoch, clip) with `random_crop`), shorter ones zero-padded; `None` pads to the batch's longest.
    `transform(batch) -> batch` runs in the worker (targets, augmentation parameters).
    """

    def __init__(
        self,
        store: str | AudioStore,
        batch_size: int,
        *,
        epoch: int = 0,
        seed: int = 0,
        clip_samples: int | None = None,
        random_crop: bool = False,
        shuffle: bool = True,
        span_clips: int | None = None,
        shuffle_window: int = 256,
        rank: int = 0,
        world_size: int = 1,
        transform: Callable[[Batch], Batch] | None = None,
        skip_batches: int = 0,
    ) -> None:
        super().__init__()
        self.store = AudioStore.open(store) if isinstance(store, str) else store
        self.batch_size = batch_size
        self.epoch = epoch
        self.seed = seed
        self.clip_samples = clip_samples
        self.random_crop = random_crop
        self.transform = transform
        self.skip_batches = skip_batches
        self.plan = plan_epoch(
            len(self.store),
            batch_size,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            shuffle_window=shuffle_window,
            # Default: the store's chunks, one read each.
            **(
                {"span_bounds": self.store.chunk_spans()}
                if span_clips is None
                else {"span_clips": span_clips}
            ),
        )

    def __len__(self) -> int:
        return self.plan.num_batches

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader asks worker 0 first; after skipping, the next batch may be another worker's, so
        # physical workers take the logical roles rotated to start there.
        logical, skip = self._resume_role(worker, num_workers)
        for window in worker_windows(self.plan, logical, num_workers):
            if skip >= len(window):
                skip -= len(window)
                continue
            clips = self._read_window(np.concatenate(window))
            for batch_indices in window[skip:]:
                yield self._collate(batch_indices, clips)
            skip = 0

    def _resume_role(self, worker: int, num_workers: int) -> tuple[int, int]:
        """(logical worker, batches it skips) for physical `worker` after `skip_batches` were consumed."""
        counts = [sum(len(w) for w in worker_windows(self.plan, k, num_workers)) for k in range(num_workers)]
        order = loader_order(counts)
        skips = [0] * num_workers
        for logical, _ in order[: self.skip_batches]:
            skips[logical] += 1
        first = order[self.skip_batches][0] if self.skip_batches < len(order) else 0
        logical = (worker + first) % num_workers
        return logical, skips[logical]

    def _read_window(self, indices: np.ndarray) -> dict[int, np.ndarray]:
        """All clips of a window, one read per run of neighbouring clips."""
        ordered = np.sort(indices)
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        clips: dict[int, np.ndarray] = {}
        for run in np.split(ordered, breaks):
            start, stop = int(run[0]), int(run[-1]) + 1
            clips.update(enumerate(self.store.read_clips(start, stop), start=start))
        return clips

    def _collate(self, indices: np.ndarray, clips: dict[int, np.ndarray]) -> Batch:
        rows = [clips[int(i)] for i in indices]
        lengths = np.array([len(clip) for clip in rows], dtype=np.int64)
        width = int(lengths.max()) if self.clip_samples is None else self.clip_samples
        starts = (
            crop_offsets(lengths, width, self.seed, self.epoch, indices)
            if self.random_crop and self.clip_samples is not None
            else None
        )
        waveform = torch.empty((len(indices), width), dtype=torch.int16)
        if get_worker_info() is not None:
            # Written straight into shared memory: otherwise the DataLoader copies every finished batch into
            # a new shared-memory segment to send it to the main process.
            waveform.share_memory_()
        _, kept = pack_clips(rows, width, starts, out=waveform.numpy())
        batch: Batch = {
            "index": torch.from_numpy(np.asarray(indices, dtype=np.int64)),
            "waveform": waveform,
            "length": torch.from_numpy(kept),
        }
        return self.transform(batch) if self.transform is not None else batch


class Int16Batches:
    """DataModule mixin for the batch convention of `ced_lightning.audio`: waveforms cross the workers'
    shared memory and the host-device link as int16 and become float32 on the device (Lightning calls this
    hook after moving each batch there)."""

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        if batch["waveform"].dtype == torch.int16:
            batch["waveform"] = int16_to_float(batch["waveform"])
        return batch


class ResumableLoader(DataLoader):
    """A DataLoader over a `ClipBatchStream` (batches come collated) that Lightning can checkpoint.

    Lightning saves `state_dict()` of stateful training loaders in its checkpoints and hands it back through
    `load_state_dict()` on resume; the next iteration then skips the batches already consumed.
    """

    def __init__(self, stream: ClipBatchStream, **kwargs: Any) -> None:
        kwargs.setdefault("persistent_workers", False)
        if kwargs.get("num_workers", 0) == 0:
            kwargs.pop("persistent_workers")
            kwargs.pop("prefetch_factor", None)
        super().__init__(stream, batch_size=None, **kwargs)
        self._consumed = 0

    def __iter__(self) -> Iterator[Batch]:
        stream: ClipBatchStream = self.dataset
        self._consumed = stream.skip_batches
        for batch in super().__iter__():
            self._consumed += 1
            yield batch
        stream.skip_batches = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.dataset.epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        stream: ClipBatchStream = self.dataset
        if state.get("epoch") == stream.epoch:
            stream.skip_batches = int(state.get("batches", 0))
