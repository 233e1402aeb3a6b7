"""Batching clips by length and padding (`ced_lightning.data.batching`): the one grouping and padding that
evaluation, predict and the data modules' evaluation loaders use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ced_lightning.data.batching import batches_by_length, pad_batch
from ced_lightning.data.labeled import EqualLengthBatches, collate_clips


def test_batches_by_length():
    assert batches_by_length([5, 3, 5, 5, 3], batch_size=2) == [[1, 4], [0, 2], [3]]
    assert batches_by_length([100, 101, 300], batch_size=8, tolerance=1) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="batch_size"):
        batches_by_length([1], batch_size=0)


def test_pad_batch_pads_tensors_and_int16_arrays_at_the_end():
    waveform, lengths = pad_batch([torch.ones(3), torch.full((5,), 2.0)])
    assert waveform.dtype == torch.float32 and lengths.tolist() == [3, 5]
    assert waveform.tolist() == [[1, 1, 1, 0, 0], [2, 2, 2, 2, 2]]
    clips = [np.arange(1, 3, dtype=np.int16), np.arange(1, 5, dtype=np.int16)]
    waveform, lengths = pad_batch(clips)
    assert waveform.dtype == torch.int16 and waveform.tolist() == [[1, 2, 0, 0], [1, 2, 3, 4]]
    # The data modules' evaluation batches are the same padding, with their indices.
    batch = collate_clips([{"index": 7, "waveform": clips[0]}, {"index": 2, "waveform": clips[1]}])
    assert torch.equal(batch["waveform"], waveform) and torch.equal(batch["length"], lengths)
    assert batch["index"].tolist() == [7, 2]


def test_equal_length_batches_are_batches_by_length_split_over_ranks():
    lengths = np.random.default_rng(0).choice([16000, 8000, 12345], size=50)
    grouped = batches_by_length(lengths.tolist(), 4)
    assert list(EqualLengthBatches(lengths, 4)) == grouped
    assert [list(EqualLengthBatches(lengths, 4, rank=r, world_size=3)) for r in range(3)] == [
        grouped[r::3] for r in range(3)
    ]
