"""Segments: the rule that splits clips into logit-store rows, the reads of rows, and the training stream over
them (extraction and distillation over segments are tested in test_extract.py and test_train.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ced_lightning.data.stream import ClipBatchStream, ResumableLoader
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.audio_writer import write_audio_store
from ced_lightning.store.segments import SegmentTable, read_segments, segment_counts, segment_table

S = 100  # samples per segment in the rule's tests


@pytest.mark.parametrize(
    ("length", "starts"),
    [
        (0, [0]),  # an empty clip is still one (padded) segment
        (30, [0]),  # shorter than half a segment: one segment at 0, padded
        (99, [0]),
        (100, [0]),
        (149, [0]),  # the rest (49) is under half a segment: left out
        (150, [0, 100]),  # exactly half: kept
        (199, [0, 100]),
        (200, [0, 100]),
        (1049, [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]),
        (1050, [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]),
    ],
)
def test_rule_whole_segments_and_the_last_when_at_least_half(length: int, starts: list[int]) -> None:
    table = segment_table(np.array([length]), S)
    assert table.start.tolist() == starts and table.clip.tolist() == [0] * len(starts)
    assert segment_counts(np.array([length]), S).tolist() == [len(starts)]


def test_odd_segment_length_half_rounds_up() -> None:
    # Half of 101 samples is 50.5: a rest of 50 is under it, 51 is not.
    assert segment_counts(np.array([151, 152]), 101).tolist() == [1, 2]


def test_table_over_many_clips_lengths_and_dtypes() -> None:
    lengths = np.array([40, 250, 100, 1000, 160])
    table = segment_table(lengths, S)
    assert table.clip.dtype == np.int32 and table.start.dtype == np.int64
    assert table.clip.tolist() == [0, 1, 1, 1, 2, *[3] * 10, 4, 4]
    assert table.start.tolist() == [0, 0, 100, 200, 0, *range(0, 1000, 100), 0, 100]
    # Samples each row reads: the segment, cut at the clip's end.
    assert table.lengths(lengths).tolist() == [40, 100, 100, 50, 100, *[100] * 10, 100, 60]
    assert not table.is_one_per_clip(len(lengths))


def test_clips_that_fit_one_segment_are_one_row_each() -> None:
    lengths = np.array([100, 30, 120, 149])
    table = segment_table(lengths, S)
    assert table.is_one_per_clip(4)
    one = SegmentTable.one_per_clip(4, S)
    assert np.array_equal(table.clip, one.clip) and np.array_equal(table.start, one.start)


def test_bad_segment_length_refused() -> None:
    with pytest.raises(ValueError, match="segment length must be >= 1"):
        segment_table(np.array([10]), 0)


def test_row_bounds_keep_clip_groups_and_cut_long_clips() -> None:
    lengths = np.array([100, 100, 2000, 100, 100])  # clip 2: 20 segments
    table = segment_table(lengths, S)
    bounds = table.row_bounds(np.array([0, 2, 3, 5]), piece_rows=8)
    # Rows: 0-1 clips 0-1, 2-21 clip 2 (in pieces of 8), 22-23 clips 3-4.
    assert bounds.tolist() == [0, 2, 10, 18, 22, 24]
    one = SegmentTable.one_per_clip(5, S)
    assert one.row_bounds(np.array([0, 2, 3, 5])).tolist() == [0, 2, 3, 5]


@pytest.fixture(scope="module")
def long_store(tmp_path_factory: pytest.TempPathFactory) -> AudioStore:
    rng = np.random.default_rng(0)
    lengths = [1200, 800, 4700, 1600, 300, 2550, 1000]
    clips = [
        (f"clip{i}", rng.uniform(-0.5, 0.5, n).astype(np.float32), [i % 2]) for i, n in enumerate(lengths)
    ]
    url = tmp_path_factory.mktemp("segments") / "long.zarr"
    write_audio_store(url, clips, class_names=["a", "b"], chunk_samples=6000, shard_chunks=2)
    return AudioStore.open(url)


def test_read_segments_equals_slices_of_whole_clips(long_store: AudioStore) -> None:
    table = segment_table(long_store.lengths, 1000)
    lengths = table.lengths(long_store.lengths)
    whole = [long_store.read_samples(i) for i in range(len(long_store))]
    for rows in (np.arange(len(table)), np.array([5, 2, 3, 9, 10, 11]), np.array([7])):
        got = read_segments(long_store, table, rows)
        assert sorted(got) == sorted(rows.tolist())
        for r in rows:
            c, s = int(table.clip[r]), int(table.start[r])
            np.testing.assert_array_equal(got[int(r)], whole[c][s : s + lengths[r]])


def test_stream_over_segments_visits_every_row_with_its_audio(long_store: AudioStore) -> None:
    table = segment_table(long_store.lengths, 1000)
    stream = ClipBatchStream(long_store, 2, epoch=1, seed=3, clip_samples=1000, segments=table, shuffle=True)
    seen = []
    for batch in stream:
        for row, wave, kept in zip(batch["index"].tolist(), batch["waveform"], batch["length"].tolist()):
            c, s = int(table.clip[row]), int(table.start[row])
            expected = long_store.read_samples(c)[s : s + 1000]
            assert kept == len(expected)
            np.testing.assert_array_equal(wave[:kept].numpy(), expected)
            assert (wave[kept:] == 0).all()
            seen.append(row)
    assert len(seen) == len(table) // 2 * 2 and len(set(seen)) == len(seen)
    with pytest.raises(ValueError, match="without random_crop"):
        ClipBatchStream(long_store, 2, clip_samples=1000, random_crop=True, segments=table)


def test_one_row_per_clip_stream_equals_the_clip_stream(long_store: AudioStore) -> None:
    """A table of one segment per clip (every store without positions) feeds the batches of before."""
    table = SegmentTable.one_per_clip(len(long_store), 1000)
    a = ClipBatchStream(long_store, 2, epoch=2, seed=5, clip_samples=1000, shuffle_window=2)
    b = ClipBatchStream(long_store, 2, epoch=2, seed=5, clip_samples=1000, shuffle_window=2, segments=table)
    assert repr(a.plan) == repr(b.plan)
    batches = 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert np.array_equal(x[key].numpy(), y[key].numpy()), key
        batches += 1
    assert batches == 3


def test_audio_store_read_clip_range(long_store: AudioStore) -> None:
    whole = long_store.read_samples(2)
    np.testing.assert_array_equal(long_store.read_clip_range(2, 1000, 3500), whole[1000:3500])
    with pytest.raises(IndexError, match="out of range for clip 2"):
        long_store.read_clip_range(2, 4000, 4800)


def test_read_segments_over_a_list_of_stores(long_store: AudioStore, tmp_path) -> None:
    """The list-of-stores view (`store.concat`) serves segment reads: rows of the second store's long clip
    are its own stretches of audio."""
    from ced_lightning.store.concat import ConcatAudioStore

    rng = np.random.default_rng(1)
    first = tmp_path / "first.zarr"
    write_audio_store(
        first, [("a", rng.uniform(-0.5, 0.5, 900).astype(np.float32), [0])], class_names=["a", "b"]
    )
    both = ConcatAudioStore([AudioStore.open(first), long_store])
    table = segment_table(both.lengths, 1000)
    lengths = table.lengths(both.lengths)
    got = read_segments(both, table, np.arange(len(table)))
    for r in range(len(table)):
        c, s = int(table.clip[r]), int(table.start[r])
        np.testing.assert_array_equal(got[r], both.read_samples(c)[s : s + lengths[r]])
    # The 4,700-sample clip, now clip 3: 4 whole segments and a rest of 700.
    assert (table.clip == 3).sum() == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_epoch_of_segments_trains_the_rest_exactly(long_store: AudioStore, workers: int) -> None:
    """A run resumed mid-epoch (Lightning hands the loader's state back) gets exactly the segment batches
    the interrupted run had left, rows of the long clips included."""
    table = segment_table(long_store.lengths, 500)

    def loader() -> ResumableLoader:
        stream = ClipBatchStream(
            long_store, 3, epoch=1, seed=4, clip_samples=500, segments=table, shuffle_window=3
        )
        return ResumableLoader(stream, num_workers=workers)

    full = [(b["index"].numpy().copy(), b["waveform"].clone()) for b in loader()]
    assert len(full) == len(table) // 3 >= 6
    first = loader()
    iterator = iter(first)
    for _ in range(4):
        next(iterator)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    rest = [(b["index"].numpy().copy(), b["waveform"].clone()) for b in resumed]
    assert len(rest) == len(full) - 4
    for (i_full, w_full), (i_rest, w_rest) in zip(full[4:], rest, strict=True):
        assert np.array_equal(i_full, i_rest) and np.array_equal(w_full.numpy(), w_rest.numpy())
