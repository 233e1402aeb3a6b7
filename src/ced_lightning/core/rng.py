"""Counter-based random draws and the one table of their stream ids.

Every random choice that must replay exactly (augmentation parameters, mixup λ, the order and crops of a
training epoch) is `counter_uniform(seed, epoch, index, stream)`: a pure hash, so a clip's draw never depends
on batch composition, worker or rank count, or library versions. Draws that must be independent of each
other use different streams; `STREAMS` lists every id in use, so a new draw takes ids no other draw has
(tests/test_rng.py checks the table has no overlaps but the one documented in `KNOWN_OVERLAPS`).
The ids are part of what stores and resumed runs replay: never renumber one.
"""

from __future__ import annotations

import numpy as np

# Stream ids, by user. A range holds one id per slot (augmentation: one per mask slot; window order: the
# rank is added to its first id).
STREAMS: dict[str, range] = {
    "augment.shift_apply": range(1, 2),
    "augment.shift_amount": range(2, 3),
    "augment.gain": range(3, 4),
    "augment.time_width": range(0x100, 0x200),
    "augment.time_start": range(0x200, 0x300),
    "augment.freq_width": range(0x300, 0x400),
    "augment.freq_start": range(0x400, 0x500),
    "losses.mixup_lambda": range(0x313C, 0x313D),
    "stream.span_order": range(0x5A01, 0x5A02),
    "stream.window_order": range(0x5A03, 0x5A03 + 0x400),  # + rank, up to 1024 ranks
    "stream.crop": range(0x5A04, 0x5A05),
}

# Overlaps that exist and stay, because renumbering would change what runs of before drew. Window order of
# rank r uses id 0x5A03 + r, so rank 1 shares the crop's id 0x5A04; the two are keyed by different epochs
# (window order by epoch * 65537 + window, crop by epoch), so they coincide only for rank 1's windows of
# epoch 0 against the crops of epoch `window`.
KNOWN_OVERLAPS: frozenset[frozenset[str]] = frozenset({frozenset({"stream.window_order", "stream.crop"})})

# Inconsistent teaching draws fresh augmentation parameters under the run's seed plus this offset, so they
# never coincide with the teachers' stored ones (drawn under the seed itself) in the same streams.
FRESH_AUGMENT_SEED_OFFSET = 0x5EED_0F_57D


def stream_id(name: str, slot: int = 0) -> int:
    """The id of slot `slot` of stream `name` (a key of `STREAMS`)."""
    ids = STREAMS[name]
    if not 0 <= slot < len(ids):
        raise ValueError(f"stream {name!r} has slots 0..{len(ids) - 1}, not {slot}")
    return ids[slot]


_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_KEY_EPOCH = np.uint64(0xD1B54A32D192ED03)
_KEY_STREAM = np.uint64(0x8CB92BA72F3D8DD7)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-avalanched mix of uint64 (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniform(seed: int, epoch: int, indices: np.ndarray, stream: int) -> np.ndarray:
    """float64 `[len(indices)]` in [0, 1), a pure function of (seed, epoch, index, stream).

    Pure integer arithmetic (SplitMix64 rounds keyed in turn by seed, epoch and stream, then the index), so
    the value of a clip never depends on batch composition, worker or rank count, or library versions.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D integer array, got {indices.dtype}{list(indices.shape)}")
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([int(seed) & _MASK64], dtype=np.uint64))
        key = _splitmix64(key ^ (np.uint64(int(epoch) & _MASK64) * _KEY_EPOCH))
        key = _splitmix64(key ^ (np.uint64(int(stream) & _MASK64) * _KEY_STREAM))
        h = _splitmix64(key ^ indices.astype(np.int64).view(np.uint64))
        h = _splitmix64(h)  # a second round so neighbouring indices decorrelate fully
    # the top 53 bits make an exact double in [0, 1)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
