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
the same batches; `ResumableLoader` records how many batches were consumed (and by how many workers and
ranks) and skips them on resume. With another `data.num_workers` the rest of the epoch follows the recorded
workers' order; another rank count is refused mid-epoch (end-of-epoch checkpoints resume on any).

`order_workers` (`data.order_workers`) fixes the worker count whose order a run follows, whatever the number
of processes that read: the demo reads in its main process (`data.num_workers=0`: on a 2-core CPU worker
processes cost its training steps more than they save) in the order of 2 workers, so its numbers are those
of a run with 2.
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

from ced_lightning.core.audio import int16_to_float, pack_clips
from ced_lightning.core.errors import ConfigError, InputError
from ced_lightning.core.rng import counter_uniform, stream_id
from ced_lightning.store import AudioStore
from ced_lightning.store.segments import SegmentTable, read_segments

Batch = dict[str, Any]

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
    keep: np.ndarray | None = None,
    drop_last: bool = True,
) -> EpochPlan:
    """Split the epoch's clips into this rank's batches.

    Spans are dealt to ranks in the shuffled span order, so ranks read disjoint clips; every rank gets the
    same number of full batches (what DDP needs), the few clips beyond that are left out of this epoch
    (they come back in the next epoch's order). `keep` (bool `[num_clips]`) leaves the other clips out of
    this epoch altogether (clips without targets in it); the rest are planned as if those were not there.
    With `drop_last=False` the clips beyond the full batches end the epoch in one shorter batch (the original
    CED's loader: every row once per pass); on several ranks each rank then takes as many clips as the
    smallest share holds, so that ranks still step together.
    """
    if batch_size < 1 or span_clips < 1:
        raise ConfigError("batch_size and span_clips must be at least 1")
    if span_bounds is None:
        span_bounds = np.append(np.arange(0, num_clips, span_clips, dtype=np.int64), num_clips)
    span_bounds = np.asarray(span_bounds, dtype=np.int64)
    if span_bounds[0] != 0 or span_bounds[-1] != num_clips or (np.diff(span_bounds) <= 0).any():
        raise ValueError(f"span_bounds must rise strictly from 0 to {num_clips}")
    if keep is not None and np.shape(keep) != (num_clips,):
        raise ValueError(f"keep must be a bool mask of the {num_clips} clips, got shape {np.shape(keep)}")
    # Small stores have few chunks: split long spans so that every rank still gets a fair share.
    longest = max(1, num_clips // (8 * world_size))
    if (np.diff(span_bounds) > longest).any():
        pieces = [np.arange(a, b, longest) for a, b in itertools.pairwise(span_bounds)]
        span_bounds = np.append(np.concatenate(pieces), num_clips)
    spans = np.arange(len(span_bounds) - 1, dtype=np.int64)
    if shuffle:
        spans = _hashed_order(seed, epoch, spans, stream_id("stream.span_order"))
    rank_spans = [spans[r::world_size] for r in range(world_size)]

    def clips_of(chosen: np.ndarray) -> np.ndarray:
        if len(chosen) == 0:
            return np.zeros(0, dtype=np.int64)
        clips = np.concatenate([np.arange(span_bounds[j], span_bounds[j + 1]) for j in chosen])
        return clips if keep is None else clips[np.asarray(keep, dtype=bool)[clips]]

    sequences = [clips_of(s) for s in rank_spans]
    share = min(len(seq) for seq in sequences)
    num_batches = share // batch_size if drop_last else math.ceil(share / batch_size)
    sequence = sequences[rank][: num_batches * batch_size if drop_last else share]
    window = max(shuffle_window, MIN_WINDOW_SPANS * int(np.diff(span_bounds).max()))
    window_batches = max(1, math.ceil(window / batch_size)) if shuffle else max(1, num_batches)
    window_clips = window_batches * batch_size
    windows = []
    window_stream = stream_id("stream.window_order", rank)
    for w, begin in enumerate(range(0, len(sequence), window_clips)):
        clips = sequence[begin : begin + window_clips]
        if shuffle:
            # Keyed by (epoch, window, rank) so windows differ; clip indices keep the draw per clip.
            clips = clips[np.argsort(counter_uniform(seed, epoch * 65_537 + w, clips, window_stream))]
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
    uniform = counter_uniform(seed, epoch, indices, stream_id("stream.crop"))
    return np.minimum((uniform * (room + 1)).astype(np.int64), room)


class ClipBatchStream(IterableDataset):
    """Yields collated training batches `{"index", "waveform" [B, T] int16, "length"}` (+ `transform`).

    Waveforms stay int16 until they reach the model's device (`Int16Batches.on_after_batch_transfer`
    converts them there).

    `clip_samples` fixes T: longer clips are cropped (from the start, or at a random offset keyed by
    (seed, epoch, clip) with `random_crop`), shorter ones zero-padded; `None` pads to the batch's longest.
    `transform(batch) -> batch` runs in the worker (targets, augmentation parameters). `keep` (bool per clip)
    leaves the other clips out of the epoch (`plan_epoch`); so does `drop_last` the last partial batch.
    `order_workers`: yield the batch order of that many DataLoader workers, read by however many there are
    (None: the order of the workers that read).

    With `segments` (a logit store's rows, `ced_lightning.store.segments`) the items are segments instead of
    clips: `index` is the row, its samples are the row's segment of its clip (cut to `clip_samples`), and
    `keep` is per row. Rows are planned in spans of the store's chunks as clips are (a clip's segments lie
    side by side), so a long recording's segments spread over the epoch like other clips.
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
        keep: np.ndarray | None = None,
        segments: SegmentTable | None = None,
        drop_last: bool = True,
        order_workers: int | None = None,
    ) -> None:
        super().__init__()
        if order_workers is not None and order_workers < 1:
            raise ConfigError(
                f"data.order_workers={order_workers}: must be 1 or more (null: data.num_workers)"
            )
        self.order_workers = order_workers
        self.store = AudioStore.open(store) if isinstance(store, str) else store
        if segments is not None and (random_crop or clip_samples is None):
            raise ConfigError(
                "segments are read from their start at a fixed clip_samples, without random_crop"
            )
        self.segments = segments
        self.batch_size = batch_size
        self.epoch = epoch
        self.seed = seed
        self.clip_samples = clip_samples
        self.random_crop = random_crop
        self.transform = transform
        self.skip_batches = skip_batches
        # How many DataLoader workers consumed those `skip_batches` (None: as many as now). The batch order
        # depends on it (windows are dealt to workers round robin).
        self.skip_workers: int | None = None
        self.rank, self.world_size = rank, world_size
        chunk_spans = self.store.chunk_spans() if span_clips is None else None
        if segments is not None and chunk_spans is not None:
            chunk_spans = segments.row_bounds(chunk_spans)
        self.plan = plan_epoch(
            len(self.store) if segments is None else len(segments),
            batch_size,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            shuffle_window=shuffle_window,
            keep=keep,
            drop_last=drop_last,
            # Default: the store's chunks, one read each.
            **({"span_bounds": chunk_spans} if span_clips is None else {"span_clips": span_clips}),
        )

    def __len__(self) -> int:
        return self.plan.num_batches

    def order_of(self, readers: int) -> int:
        """The worker count whose batch order this stream yields when `readers` DataLoader workers read it
        (0: the main process, which reads like 1)."""
        return self.order_workers or max(1, readers)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order_of(num_workers)
        if self.skip_batches or order != num_workers:
            yield from self._continue_order(worker, num_workers, self.skip_workers or order)
            return
        for window in worker_windows(self.plan, worker, num_workers):
            clips = self._read_window(np.concatenate(window))
            for batch_indices in window:
                yield self._collate(batch_indices, clips)

    def _continue_order(self, worker: int, num_workers: int, consumed_with: int) -> Iterator[Batch]:
        """The rest of the batch order of `consumed_with` workers, which consumed `skip_batches`, yielded by
        `num_workers` workers (the same number or another): the resumed epoch trains exactly the batches the
        interrupted run had left, in its order (so also under `limit_train_batches`, which cuts it short).

        The remaining order is dealt to the workers round robin, which the DataLoader's round robin yields
        back in that order. A worker's batches then come from several windows (one per old worker at a
        time): it reads from each window only the clips of its own batches, once, and drops them after its
        last batch from that window. Used for the rest of one epoch; the next one plans for `num_workers`
        (and for every epoch where `order_workers` differs from the readers: `skip_batches` is then 0).
        """
        streams = [
            [
                (k + consumed_with * j, batch)
                for j, window in enumerate(worker_windows(self.plan, k, consumed_with))
                for batch in window
            ]
            for k in range(consumed_with)
        ]
        order = loader_order([len(s) for s in streams])[self.skip_batches :]
        mine = [streams[k][b] for k, b in order[worker::num_workers]]
        needed: dict[int, list[np.ndarray]] = {}
        last_use: dict[int, int] = {}
        for i, (window_id, batch_indices) in enumerate(mine):
            needed.setdefault(window_id, []).append(batch_indices)
            last_use[window_id] = i
        cached: dict[int, dict[int, np.ndarray]] = {}
        for i, (window_id, batch_indices) in enumerate(mine):
            if window_id not in cached:
                cached[window_id] = self._read_window(np.concatenate(needed.pop(window_id)))
            yield self._collate(batch_indices, cached[window_id])
            if last_use[window_id] == i:
                del cached[window_id]

    @property
    def _needed(self) -> int | None:
        """Samples used of each clip: its head when cropped from the start, all of it for a random crop."""
        return None if self.random_crop or self.clip_samples is None else self.clip_samples

    def _read_window(self, indices: np.ndarray) -> dict[int, np.ndarray]:
        """All clips (or rows of `segments`) of a window, one read per run of neighbouring clips."""
        if self.segments is not None:
            return read_segments(self.store, self.segments, indices)
        ordered = np.sort(indices)
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        clips: dict[int, np.ndarray] = {}
        for run in np.split(ordered, breaks):
            start, stop = int(run[0]), int(run[-1]) + 1
            clips.update(enumerate(self.store.read_clips(start, stop, max_samples=self._needed), start=start))
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
    """DataModule mixin for the batch convention of `ced_lightning.core.audio`: waveforms cross the workers'
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
        # Each iteration draws the workers' base seed from `generator`, by default torch's global one: a run
        # resumed mid-epoch would draw it again after the restore of that generator (saved after the draw),
        # and its dropout would differ from the uninterrupted run's. Keyed by (seed, epoch, rank) instead.
        seed = np.random.SeedSequence([stream.seed, stream.epoch, stream.rank]).generate_state(1)[0]
        kwargs.setdefault("generator", torch.Generator().manual_seed(int(seed)))
        if kwargs.get("num_workers", 0) == 0:
            kwargs.pop("persistent_workers")
            kwargs.pop("prefetch_factor", None)
        super().__init__(stream, batch_size=None, **kwargs)
        self._consumed = 0
        # The worker count whose order this epoch follows: another one after a resume with another
        # data.num_workers, kept for the rest of that epoch so that a second resume skips the same order.
        self._order_of = self._order_workers
        self._refusal: str | None = None  # why the loaded state cannot resume here (see load_state_dict)

    def __iter__(self) -> Iterator[Batch]:
        if self._refusal is not None:
            raise InputError(self._refusal)
        stream: ClipBatchStream = self.dataset
        self._consumed = stream.skip_batches
        self._order_of = (stream.skip_workers if stream.skip_batches else None) or self._order_workers
        for batch in super().__iter__():
            self._consumed += 1
            yield batch
        stream.skip_batches, stream.skip_workers = 0, None

    @property
    def _order_workers(self) -> int:
        """The number of interleaved worker orders: the stream's `order_workers`, else one per worker (0
        workers, the main process, reads like 1)."""
        stream: ClipBatchStream = self.dataset
        return stream.order_of(self.num_workers)

    def state_dict(self) -> dict[str, int]:
        stream: ClipBatchStream = self.dataset
        return {
            "epoch": stream.epoch,
            "batches": self._consumed,
            "epoch_batches": len(stream),
            "num_workers": self._order_of,
            "world_size": stream.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        stream: ClipBatchStream = self.dataset
        if state.get("epoch") != stream.epoch:
            return  # saved at the end of an epoch (or before it began): the new epoch starts from its start
        batches = int(state.get("batches", 0))
        # States saved before these keys existed: assume the same workers and ranks (all one could resume).
        world_size = int(state.get("world_size", stream.world_size))
        workers = int(state.get("num_workers", self._order_workers))
        if world_size != stream.world_size and batches > 0:
            if batches >= int(state.get("epoch_batches", batches + 1)):
                batches = len(stream)  # that epoch was over: nothing of it is left
            else:
                # The ranks' shares of the epoch (and the batches per step) depend on the rank count, and
                # Lightning counts the rest of the epoch in steps: no continuation on another count trains
                # each remaining clip once and ends the epoch where Lightning expects. Refuse rather than
                # repeat or drop clips silently. Only when iterated: after an end-of-epoch checkpoint under
                # `limit_train_batches` (fewer batches than the epoch's), Lightning first builds that epoch's
                # loader and hands it this state, then replaces it with the next epoch's without reading it.
                self._refusal = (
                    f"this checkpoint was saved {batches} batches into epoch {stream.epoch} of a run on "
                    f"{world_size} ranks (trainer.devices x trainer.num_nodes), and this run has "
                    f"{stream.world_size}: the rest of that epoch cannot be split over {stream.world_size} "
                    f"ranks without training some clips twice and skipping others. Resume with {world_size} "
                    "ranks, or from a checkpoint saved at the end of an epoch (those resume on any number of "
                    "ranks and data.num_workers)."
                )
        # Another data.num_workers is fine: the stream continues the order of the workers that consumed them.
        stream.skip_batches, stream.skip_workers = batches, workers
        self._consumed, self._order_of = batches, workers
