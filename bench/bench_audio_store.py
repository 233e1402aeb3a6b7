"""Audio store read path: random `read` per clip vs `read_span` of whole chunks vs an in-memory floor.

A temporary store of synthetic 10 s clips (the demo generator, default layout: 160 s chunks of 16 clips,
4 chunks per shard, uncompressed). Ways to get float32 torch tensors of clips:

- `read`: one random clip per call (exact random access, what a naive map-style Dataset does);
- `read_span`: the clips of one chunk per call, chunks in shuffled order (the training stream's path);
- the same with the `zstd` compression option;
- floor: the same spans as one slice of an in-memory int16 array, converted to float32 (no store at all);
- the training stream (`ClipBatchStream` in a DataLoader) with 0 and 2 workers, in steady state, and the
  ceiling of a DataLoader with 2 workers on this machine: empty batches of the same shape and dtype, so
  that what worker processes cost here (shared memory, pickling, scheduling) is visible on its own.

- the original code's read path, side by side: the same clips in its HDF5 layout (one uncompressed int16
  dataset per clip, as its `wavlist_to_hdf5.py` writes them), read one random clip per call and converted as
  its dataset does (`data / 32768.` in float64, then float32, then a tensor).

The issue measured that reader at ~1,260 random 10 s clips/s per process on this machine class; the goal for
the training path is at least 3x the reader, measured here in the same run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import CLIP_SAMPLES, CLIP_SECONDS, measure, rate, ratio, stream_rate
from ced_lightning.core.audio import int16_to_float
from ced_lightning.data.demo import generate_demo_clip
from ced_lightning.data.stream import ClipBatchStream, ResumableLoader
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.audio_writer import write_audio_store

_CEILING = "DataLoader ceiling, 2 workers (empty batches of the same shape)"
_ORIGINAL = "original HDF5 reader (its layout and per-clip read, random clip per call)"


def _make_store(root: Path, clips: int, compression: str = "none") -> AudioStore:
    def gen():
        for i in range(clips):
            wave, labels = generate_demo_clip(0, i, CLIP_SECONDS)
            yield f"clip_{i:05d}", wave, labels

    return write_audio_store(
        root / f"bench_{compression}.zarr",
        gen(),
        source="bench",
        config={"clips": clips},
        compression=compression,
    )


class _EmptyBatches(torch.utils.data.IterableDataset):
    """Batches shaped like the training stream's (int16 [32, 160000] in shared memory), with no reading: what
    a DataLoader with worker processes can move at most on this machine."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        for _ in range(self.batches // workers):
            waveform = torch.empty(32, CLIP_SAMPLES, dtype=torch.int16).share_memory_()
            waveform.fill_(0)
            yield {"index": torch.arange(32), "waveform": waveform}


def _write_original_layout(path: Path, store: AudioStore) -> None:
    """The store's clips as the original code keeps them: one HDF5 file, one int16 dataset per clip name."""
    import h5py

    with h5py.File(path, "w") as handle:
        for i, name in enumerate(store.names):
            handle[name] = store.read_samples(i)


def _original_reads(path: Path, names: list[str], order: np.ndarray) -> None:
    """The original dataset's per-item read (file handle cached, as it does), for every clip in `order`."""
    import h5py

    with h5py.File(path, "r") as handle:
        for i in order:
            data = handle[names[int(i)]][:]
            torch.as_tensor((data / 32768.0).astype("float32"), dtype=torch.float32)


def _to_tensors(flat: np.ndarray, offsets: np.ndarray) -> list[torch.Tensor]:
    wave = int16_to_float(torch.from_numpy(flat))
    return list(torch.split(wave, np.diff(offsets).tolist()))


def run(quick: bool = True) -> dict[str, Any]:
    clips = 640 if quick else 2400
    repeats = 3 if quick else 7
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = _make_store(Path(tmp), clips)
        zstd = _make_store(Path(tmp), clips, "zstd")
        memory = np.asarray(store.audio[:], dtype=np.int16)
        original = Path(tmp) / "original_layout.h5"
        _write_original_layout(original, store)
        order = rng.permutation(clips)
        bounds = store.chunk_spans()
        spans = [(int(bounds[j]), int(bounds[j + 1])) for j in rng.permutation(len(bounds) - 1)]

        def random_reads() -> None:
            for i in order:
                store.read(int(i))

        def span_reads(source: AudioStore = store) -> None:
            for start, stop in spans:
                _to_tensors(*source.read_span(start, stop))

        def floor_reads() -> None:
            for start, stop in spans:
                a, b = int(store.offsets[start]), int(store.offsets[stop - 1] + store.lengths[stop - 1])
                _to_tensors(memory[a:b], np.append(store.offsets[start:stop], b) - a)

        def stream_epoch(workers: int) -> ResumableLoader:
            # The training path as a DataLoader delivers it: collated [32, 160000] int16 batches, made float32
            # by `stream_rate` as the training process does.
            stream = ClipBatchStream(store, 32, epoch=0, seed=0, clip_samples=CLIP_SAMPLES, shuffle_window=64)
            return ResumableLoader(stream, num_workers=workers)

        streams = {w: stream_rate(lambda w=w: stream_epoch(w), repeats=repeats) for w in (0, 2)}
        ceiling = stream_rate(
            lambda: torch.utils.data.DataLoader(_EmptyBatches(clips // 32), batch_size=None, num_workers=2),
            repeats=repeats,
        )
        timings = {
            "read (random, 1 clip per call)": measure(random_reads, repeats=repeats),
            "read_span (one chunk per call, shuffled chunks)": measure(span_reads, repeats=repeats),
            "read_span, zstd store": measure(lambda: span_reads(zstd), repeats=repeats),
            "floor (in-memory int16 slice -> float32)": measure(floor_reads, repeats=repeats),
            _ORIGINAL: measure(lambda: _original_reads(original, store.names, order), repeats=repeats),
        }
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    rates = {name: rate(seconds, clips) for name, seconds in timings.items()}
    for workers, figures in streams.items():
        rates[f"training stream, {workers} workers"] = figures["clips/s"]
    rates[_CEILING] = ceiling["clips/s"]

    def r(a: str, b: str) -> float:
        return ratio(rates[a], rates[b])

    span, floor = (
        "read_span (one chunk per call, shuffled chunks)",
        "floor (in-memory int16 slice -> float32)",
    )
    result = {
        "clips": clips,
        "clip_seconds": CLIP_SECONDS,
        "store_mib": round(size / 2**20, 1),
        "clips_per_second": rates,
        "training stream seconds to the first batch (not in the rates)": {
            f"{workers} workers": figures["first batch seconds"] for workers, figures in streams.items()
        },
        "ratios": {
            "training stream 0 workers / floor": r("training stream, 0 workers", floor),
            "training stream 2 workers / floor": r("training stream, 2 workers", floor),
            "training stream 2 workers / DataLoader ceiling with 2 workers": r(
                "training stream, 2 workers", _CEILING
            ),
            "random read / floor": r("read (random, 1 clip per call)", floor),
            "read_span / floor": r(span, floor),
            "read_span / read_span of a zstd store": r(span, "read_span, zstd store"),
            "training stream 0 workers / original HDF5 reader": r("training stream, 0 workers", _ORIGINAL),
            "training stream 2 workers / original HDF5 reader": r("training stream, 2 workers", _ORIGINAL),
            "random read / original HDF5 reader": r("read (random, 1 clip per call)", _ORIGINAL),
        },
    }
    for name, value in rates.items():
        print(f"{name}: {value['median']:.0f} clips/s (min {value['min']:.0f}, max {value['max']:.0f})")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}x")
    return result


if __name__ == "__main__":
    run(quick=True)
